/// <reference path="../pb_data/types.d.ts" />
// Gives the local prompts collection the optional `priority` number field (whole numbers; empty reads as 0,
// higher runs first). imagegen checks the range (-1000 to 1000) itself and queues a record with a value
// outside it at priority 0 with a warning, so the field takes any whole number here. A migration of its own,
// so that a stack set up before the field existed gets it on its next start too; a field already there is
// left alone.
migrate(
  (app) => {
    const name = $os.getenv("IMAGEGEN_PB_COLLECTION") || "prompts";
    let prompts;
    try {
      prompts = app.findCollectionByNameOrId(name);
    } catch (_) {
      return; // no collection: nothing to extend
    }
    if (!prompts.fields.getByName("priority")) {
      prompts.fields.add(new NumberField({ name: "priority", onlyInt: true }));
      app.save(prompts);
    }
  },
  (app) => {
    // Nothing to undo: the data dir belongs to the local stack and is simply deleted.
  },
);

/// <reference path="../pb_data/types.d.ts" />
// Gives the local prompts collection the optional per-record choices: text fields `model`, `ratio` and
// `resolution` (empty means the JIMENG_* setting; the worker checks the values, so a bad one fails its record
// with a clear error instead of being refused here). A second migration, so that a stack set up before these
// fields existed gets them on its next start too; a field already there is left alone.
migrate(
  (app) => {
    const name = $os.getenv("IMAGEGEN_PB_COLLECTION") || "prompts";
    let prompts;
    try {
      prompts = app.findCollectionByNameOrId(name);
    } catch (_) {
      return; // no collection: nothing to extend
    }
    let changed = false;
    for (const field of ["model", "ratio", "resolution"]) {
      if (!prompts.fields.getByName(field)) {
        prompts.fields.add(new TextField({ name: field, max: 100 }));
        changed = true;
      }
    }
    if (changed) {
      app.save(prompts);
    }
  },
  (app) => {
    // Nothing to undo: the data dir belongs to the local stack and is simply deleted.
  },
);

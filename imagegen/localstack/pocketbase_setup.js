/// <reference path="../pb_data/types.d.ts" />
// Sets up a local PocketBase for imagegen: a superuser and the prompts collection.
// Everything comes from the environment so no credential is written to disk:
//   IMAGEGEN_PB_ADMIN_EMAIL, IMAGEGEN_PB_ADMIN_PASSWORD  the superuser (created, or its password reset)
//   IMAGEGEN_PB_COLLECTION                               the collection name (default "prompts")
// PocketBase records applied migrations, and each step checks before it writes, so running it again is harmless.
migrate(
  (app) => {
    const email = $os.getenv("IMAGEGEN_PB_ADMIN_EMAIL");
    const password = $os.getenv("IMAGEGEN_PB_ADMIN_PASSWORD");
    const name = $os.getenv("IMAGEGEN_PB_COLLECTION") || "prompts";

    if (email && password) {
      const superusers = app.findCollectionByNameOrId("_superusers");
      let admin;
      try {
        admin = app.findAuthRecordByEmail(superusers, email);
      } catch (_) {
        admin = new Record(superusers);
        admin.setEmail(email);
      }
      admin.setPassword(password);
      app.save(admin);
    }

    try {
      app.findCollectionByNameOrId(name);
      return; // already there: leave its schema alone
    } catch (_) {
      // missing: create it below
    }

    const prompts = new Collection({
      type: "base",
      name: name,
      // null rules: only superusers may list, view, create, update or delete
      listRule: null,
      viewRule: null,
      createRule: null,
      updateRule: null,
      deleteRule: null,
      fields: [
        { name: "prompt", type: "text", max: 20000 },
        { name: "negativePrompt", type: "text", max: 20000 },
        { name: "imageUrl", type: "text", max: 2000 },
        { name: "images", type: "json" },
        // empty means pending
        { name: "status", type: "select", maxSelect: 1, values: ["queued", "processing", "done", "failed"] },
        { name: "error", type: "text", max: 5000 },
        { name: "created", type: "autodate", onCreate: true, onUpdate: false },
        { name: "updated", type: "autodate", onCreate: true, onUpdate: true },
      ],
    });
    app.save(prompts);
  },
  (app) => {
    // Nothing to undo: the data dir belongs to the local stack and is simply deleted.
  },
);

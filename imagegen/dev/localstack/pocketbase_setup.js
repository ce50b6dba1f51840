/// <reference path="../pb_data/types.d.ts" />
// Sets up a local PocketBase for imagegen: its superuser. The prompts collection is made afterwards by
// `imagegen setup-collection`'s own code (see `localstack.pocketbase.create_collection`), like a user's.
// The credentials come from the environment so none is written to disk:
//   IMAGEGEN_PB_ADMIN_EMAIL, IMAGEGEN_PB_ADMIN_PASSWORD  the superuser (created, or its password reset)
// PocketBase records applied migrations, and the step checks before it writes, so running it again is harmless.
migrate(
  (app) => {
    const email = $os.getenv("IMAGEGEN_PB_ADMIN_EMAIL");
    const password = $os.getenv("IMAGEGEN_PB_ADMIN_PASSWORD");
    if (!email || !password) {
      return;
    }
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
  },
  (app) => {
    // Nothing to undo: the data dir belongs to the local stack and is simply deleted.
  },
);

"""The example of ``docs/migration.md``: an agent backend built on three module-level
singletons (:mod:`.legacy`), the same backend half way through its migration
(:mod:`.rollout`), and migrated to per-user components (:mod:`.migrated`)."""

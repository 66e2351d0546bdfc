"""Storage: where a run lives (:mod:`~distributed.storage.uris`), one run's
storage as its writer or a reader uses it, local or on an object store
(:mod:`~distributed.storage.runstore`), the object-store client
(:mod:`~distributed.storage.objectstore`) and publishing a local mirror to an
object store (:mod:`~distributed.storage.remote`)."""

"""Storage: where a run lives (:mod:`~distributed.storage.uris`), the object-store
client (:mod:`~distributed.storage.objectstore`) and publishing a local mirror to
an object store (:mod:`~distributed.storage.remote`)."""

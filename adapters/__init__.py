"""The storage port (:mod:`.ports`), its contract suite (:mod:`.contract`, importable by the
authors of other backends) and its backends: memory (the reference), the SQLite and NATS
packages (:mod:`.sqlite`, :mod:`.nats`)."""

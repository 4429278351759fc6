"""The Redis backend (the ``redis`` extra): :class:`.backend.RedisBackend`.

Its parts are composed around one connection object
(:class:`~stepsource.adapters.redis.connection.RedisConnection`): the log
(:mod:`~stepsource.adapters.redis.log`), the work queue and its leases
(:mod:`~stepsource.adapters.redis.queue`), the inbox (:mod:`~stepsource.adapters.redis.inbox`),
the global key-value store (:mod:`~stepsource.adapters.redis.kv`), and definitions with
snapshots (:mod:`~stepsource.adapters.redis.meta`). The server-side scripts are in
:mod:`~stepsource.adapters.redis.scripts`, the key names in :mod:`~stepsource.adapters.redis.keys`
and the URL in :mod:`~stepsource.adapters.redis.options`.

This package's ``__init__`` imports nothing, so a bad ``redis://`` URL is refused by
:mod:`~stepsource.adapters.redis.options` even where the redis-py driver is not installed.
See docs/redis.md.
"""

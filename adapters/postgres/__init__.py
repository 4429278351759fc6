"""The PostgreSQL backend (the ``postgres`` extra: psycopg 3). See docs/postgres.md.

``from stepsource.adapters.postgres.backend import PostgresBackend``; importing this package
or :mod:`.options` (URL parsing) does not import the driver.
"""

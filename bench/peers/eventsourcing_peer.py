"""The eventsourcing library's Application on SQLite (its ``eventsourcing.sqlite`` module).

The library puts the file in WAL mode; it leaves ``synchronous`` at SQLite's default, which
for this build is FULL (read back from the application's own connection and reported).
The transcoder is the library's default (JSON via the standard library); no snapshotting,
no aggregate cache (the defaults), so a ``get`` replays every event.

- saves: an aggregate changed once and saved, again and again (1 event per save), in one
  thread: the library's API is synchronous, and a second thread would only queue on the
  same SQLite write lock.
- replay: ``repository.get`` of an aggregate of N events (recorded 100 per save).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event

from bench.common import Recorder, Timer, main, remove_db


class Counter(Aggregate):
    def __init__(self) -> None:
        self.key = ""
        self.value: Any = None

    @event("Changed")
    def change(self, key: str, value: Any) -> None:
        self.key = key
        self.value = value


class Bench(Application[Any]):
    pass


def open_app(path: Path) -> Bench:
    os.environ["PERSISTENCE_MODULE"] = "eventsourcing.sqlite"
    os.environ["SQLITE_DBNAME"] = str(path)
    return Bench()


def synchronous_setting(app: Bench) -> dict[str, Any]:
    datastore = app.recorder.datastore  # type: ignore[attr-defined]
    with datastore.transaction(commit=False) as cursor:
        cursor.execute("PRAGMA journal_mode")
        journal = cursor.fetchone()[0]
        cursor.execute("PRAGMA synchronous")
        sync = cursor.fetchone()[0]
    return {"journal_mode": journal, "synchronous": sync}


def saves(path: Path, n: int) -> tuple[float, dict[str, Any]]:
    remove_db(path)
    app = open_app(path)
    try:
        counter = Counter()
        app.save(counter)
        with Timer() as timer:
            for i in range(n):
                counter.change("k", i)
                app.save(counter)
        found = synchronous_setting(app)
    finally:
        app.close()
        remove_db(path)
    return n / timer.seconds, found


def measure(recorder: Recorder, params: dict[str, Any], tmp: Path, profile: set[str]) -> None:
    runs = int(params["runs"])
    path = tmp / "es.db"
    for _ in range(runs):
        rate, found = saves(path, int(params["saves"]))
        recorder.add("es_saves", rate, "saves/s", events_per_save=1)
        recorder.durability["eventsourcing (SQLite)"] = found
    size = int(params["replay_events"])
    remove_db(path)
    app = open_app(path)
    try:
        counter = Counter()
        for i in range(size - 1):  # with the creation event: ``size`` events
            counter.change(f"k{i % 10}", {"i": i, "payload": "x" * 32})
            if i % 100 == 99:
                app.save(counter)
        app.save(counter)
        app.repository.get(counter.id)  # warm-up: connections open
        for _ in range(runs):
            with Timer() as timer:
                found_counter = app.repository.get(counter.id)
            assert found_counter.version == size
            recorder.add(f"es_replay_{size}", size / timer.seconds, "events/s", events=size)
    finally:
        app.close()
        remove_db(path)


if __name__ == "__main__":
    main(measure)

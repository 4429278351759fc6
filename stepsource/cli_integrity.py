"""The ``stepsource`` commands about damaged storage: ``check`` and ``quarantine``."""

from __future__ import annotations

import argparse
import os
import sqlite3

from rich.console import Console
from rich.markup import escape

from stepsource.adapters.sqlite import SQLiteBackend
from stepsource.engine.engine import Engine
from stepsource.engine.integrity import Damage, check_index, check_log, confirm_unseen
from stepsource.projections.summaries import QUARANTINED, ExecutionSummary

from .cli_output import EXIT_OK, EXIT_PROBLEM, dumps, resolve_id

__all__ = ["check", "quarantine"]


def _sqlite_file(path: str, what: str) -> list[Damage]:
    """SQLite's own check of a file: the b-trees, the indexes against their tables."""
    if not os.path.exists(path):
        return []
    if os.path.getsize(path) == 0:
        return [Damage(path, f"the {what} file is empty (0 bytes): its content is gone")]
    try:
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = connection.execute("PRAGMA integrity_check").fetchall()
        finally:
            connection.close()
    except sqlite3.DatabaseError as exc:
        return [Damage(path, f"the {what} file cannot be read: {exc}")]
    found = [str(row[0]) for row in rows]
    if found == ["ok"]:
        return []
    return [Damage(path, f"SQLite integrity_check of the {what}: {line}") for line in found]


async def _index_rows(engine: Engine) -> list[ExecutionSummary]:
    rows: list[ExecutionSummary] = []
    cursor: str | None = None
    while True:
        page = await engine.executions(limit=1000, cursor=cursor)
        rows.extend(page)
        if len(page) < 1000:
            return rows
        cursor = page[-1].execution_id


async def check(engine: Engine, args: argparse.Namespace, console: Console) -> int:
    backend = engine.store.backend
    damage: list[Damage] = []
    if isinstance(backend, SQLiteBackend):
        damage += _sqlite_file(backend.path, "log")
        readmodels = backend.readmodel_path()
        if readmodels is not None:
            damage += _sqlite_file(readmodels, "read models")
    report = await check_log(engine.store)
    if not damage:  # the index of a damaged file would only repeat the file's damage
        check_index(report, await _index_rows(engine), redact_errors=engine.store.codec.encrypted)
        await confirm_unseen(report, engine.store)
    damage += report.damage
    if args.json:
        print(
            dumps(
                {
                    "events": report.events,
                    "executions": report.executions,
                    "damage": [{"where": d.where, "what": d.what} for d in damage],
                }
            )
        )
    else:
        for item in damage:
            console.print(f"[red]damaged[/red] {escape(item.where)}: {escape(item.what)}")
        verdict = "[red]damage found[/red]" if damage else "[green]no damage found[/green]"
        console.print(
            f"checked {report.events} events of {report.executions} executions: {verdict}"
        )
    return EXIT_PROBLEM if damage else EXIT_OK


async def quarantine(engine: Engine, args: argparse.Namespace, console: Console) -> int:
    if args.action == "ls":
        rows = await engine.executions(status=QUARANTINED, limit=args.limit)
        if args.json:
            print(dumps([{"execution_id": r.execution_id, "reason": r.last_error} for r in rows]))
            return EXIT_OK
        for row in rows:
            error = row.last_error or {}
            console.print(
                f"{row.execution_id} {escape(row.step_id)} from version "
                f"{error.get('version')}: {escape(str(error.get('message')))}",
                highlight=False,
            )
        return EXIT_OK
    execution_id = await resolve_id(engine, args.id)
    version = await engine.release_quarantine(execution_id, engine.clock.now_ms())
    console.print(f"released {execution_id}: its log reads to version {version}", highlight=False)
    return EXIT_OK

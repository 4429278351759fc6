"""Merging the run of a few jobs into an earlier full run (``python -m bench.run --only JOBS
--merge``): the earlier run stays the run the report describes; the jobs' metrics, profiles,
notes and sizes replace theirs, the targets are evaluated on the whole, and the report says
which jobs were run apart, when, at which commit and under which load."""

from __future__ import annotations

from typing import Any

__all__ = ["merge_runs"]


def merge_runs(previous: dict[str, Any], run: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The earlier results with the jobs ``names`` of ``run`` merged in (``run``'s metrics,
    targets and profiles are already the merged ones)."""
    kept = [m for m in previous.get("merged", []) if m["job"] not in names]
    merged = [
        {
            "job": name,
            "generated_at": run["generated_at"],
            "commit": run["commit"],
            "load_average": run["load_average"],
        }
        for name in names
    ]
    jobs = [j for j in previous.get("jobs", []) if j["name"] not in names] + run["jobs"]
    return {
        **previous,
        "jobs": jobs,
        "metrics": run["metrics"],
        "targets": run["targets"],
        "profiles": run["profiles"],
        "notes": {**previous.get("notes", {}), **run["notes"]},
        "merged": kept + merged,
    }

"""Fold a partial run into the committed report: ``python -m bench.merge DIR [--into bench]``.

``DIR`` holds the results.json of ``python -m bench.run --only "JOB,JOB" --out DIR``. Its
jobs' metrics, profiles, durability settings and versions replace those of the same names
in ``--into``'s results.json (default: bench/), every target is evaluated again on the
merged metrics, a note says which jobs were measured again (when, at which commit, under
what load), and REPORT.md is rendered again. The rest of the report stays the full run it
was: use it when one backend changed and a full ``make bench`` (20-25 minutes) is not
warranted; a full run replaces everything.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.report import render
from bench.targets import add_floors, evaluate, targets

ROOT = Path(__file__).resolve().parent


def merge(partial: dict[str, Any], full: dict[str, Any]) -> dict[str, Any]:
    """``full`` with ``partial``'s jobs measured again (a new dict)."""
    merged: dict[str, Any] = json.loads(json.dumps(full))
    merged["metrics"].update(partial["metrics"])
    merged["profiles"].update(partial.get("profiles", {}))
    merged["durability"].update(partial.get("durability", {}))
    merged["versions"].update(
        {k: v for k, v in partial.get("versions", {}).items() if v is not None}
    )
    again = {job["name"]: job for job in partial["jobs"]}
    names = set(again)
    kept = {job["name"] for job in merged["jobs"]}
    merged["jobs"] = [again.get(j["name"], j) for j in merged["jobs"]]
    merged["jobs"] += [job for name, job in again.items() if name not in kept]
    add_floors(merged["metrics"])
    evaluated = [evaluate(t, merged["metrics"]) for t in targets(merged["mode"] == "quick")]
    for target in evaluated:
        if target["status"] == "missed" and target["ours"] in merged["profiles"]:
            target["profile"] = merged["profiles"][target["ours"]]
    merged["targets"] = evaluated
    load = partial.get("load_average", {})
    merged["notes"][f"measured again: {', '.join(sorted(names))}"] = (
        f"at commit {partial.get('commit')} on {partial.get('generated_at')} "
        f"(load average {load.get('before')} before, {load.get('after')} after), "
        "merged into this report by bench/merge.py; the other rows are the full run above"
    )
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("partial", help="the --out directory of a bench.run --only run")
    parser.add_argument("--into", default=str(ROOT), help="the report's directory")
    parser.add_argument("--note", default="", help="a note to add (other runs, caveats)")
    args = parser.parse_args()
    into = Path(args.into)
    partial = json.loads((Path(args.partial) / "results.json").read_text())
    full = json.loads((into / "results.json").read_text())
    merged = merge(partial, full)
    if args.note:
        merged["notes"][f"about the jobs measured again ({partial.get('commit')})"] = args.note
    (into / "results.json").write_text(json.dumps(merged, indent=2, sort_keys=False) + "\n")
    (into / "REPORT.md").write_text(render(merged))
    print(f"[bench merge] wrote {into / 'results.json'} and {into / 'REPORT.md'}")


if __name__ == "__main__":
    main()

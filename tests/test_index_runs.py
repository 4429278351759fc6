"""The index's lean read folds a run of light events as one :class:`Touched`; the rows it
builds equal those of one ``Touched`` per event and of the record-by-record path, whatever
the page boundaries and whatever damage the log holds.

The log is a real SQLite file written by an engine (executions interleaved, so runs break
at other executions' events); hypothesis draws where the pages end and which records are
damaged (a flipped byte, a checksum stripped, a time that is not a time under a valid
checksum).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import anyio
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import stepsource as ss
from stepsource.adapters.ports import RecordedEvent
from stepsource.engine import index_reading
from stepsource.engine.checksums import PREFIX, add_checksum, strip_checksum
from stepsource.engine.codec import EventCodec
from stepsource.projections.executions_index import IndexedExecution, fold, to_row
from stepsource.projections.summaries import Touched

CODEC = EventCodec()


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> list[RecordedEvent]:
    """The records of a log of four executions run at once (each writes state in several
    commits, so the light events of one are interleaved with the others')."""
    path: Path = tmp_path_factory.mktemp("runs") / "log.db"

    async def build() -> list[RecordedEvent]:
        engine = ss.Engine(f"sqlite:///{path}", workers=4, poll_interval=0.02)

        @engine.step("runs.writer")
        async def writer(ctx: ss.StepContext, rounds: int) -> int:
            for i in range(rounds):
                await ctx.set_state(f"k{i % 3}", i)
                if i % 4 == 3:
                    await ctx.flush()
            return rounds

        async with engine:
            handles = [await engine.start("runs.writer", {"rounds": 6 + n}) for n in range(4)]
            with anyio.fail_after(30):
                for handle in handles:
                    await handle.result()
            records = await engine.store.backend.read_all(0, 10_000)
        await engine.aclose()
        return records

    return anyio.run(build)


def damaged(record: RecordedEvent, how: str) -> RecordedEvent:
    data = record.data
    if how == "flip":
        middle = len(data) // 2
        data = data[:middle] + bytes([data[middle] ^ 0x01]) + data[middle + 1 :]
    elif how == "strip":
        data, _ = strip_checksum(record.stream_id, record.version, record.topic, data)
    else:  # a time that is not a time, under a checksum that matches
        body, _ = strip_checksum(record.stream_id, record.version, record.topic, data)
        state = orjson.loads(body)
        if "timestamp" not in state:
            return record
        state["timestamp"] = "not a time"
        data = add_checksum(record.stream_id, record.version, record.topic, orjson.dumps(state))
    return record._replace(data=data)


def checked_of(records: Sequence[RecordedEvent], start: int) -> dict[str, bool]:
    """What :func:`~stepsource.engine.index_reading.checked_before` answers for the page
    starting at index ``start``: per stream, whether its last event before has a checksum."""
    out: dict[str, bool] = {}
    for record in records[:start]:
        out[record.stream_id] = type(record.data) is bytes and record.data.startswith(PREFIX)
    return out


def rows(pages: list[index_reading.IndexBatch]) -> dict[str, tuple[object, ...]]:
    current: dict[str, IndexedExecution] = {}
    for batch in pages:
        current.update(fold(current, batch))
    return {eid: to_row(item) for eid, item in current.items()}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_runs_fold_to_the_rows_of_one_touched_per_event(
    log: list[RecordedEvent], data: st.DataObject
) -> None:
    records = list(log)
    spoil = data.draw(
        st.dictionaries(
            st.integers(0, len(records) - 1), st.sampled_from(["flip", "strip", "time"]), max_size=3
        )
    )
    for at, how in spoil.items():
        records[at] = damaged(records[at], how)
    cuts = sorted(data.draw(st.sets(st.integers(1, len(records) - 1), max_size=6)))
    bounds = list(zip([0, *cuts], [*cuts, len(records)], strict=True))
    lean, single, general = [], [], []
    for start, end in bounds:
        page = records[start:end]
        checked = checked_of(records, start)
        lean.append(index_reading.index_batch(CODEC, page, checked))
        single.append(index_reading.index_batch(CODEC, page, checked, runs=False))
        general.append(index_reading._general_batch(CODEC, page, checked))
        # every page ends at its last record's position (the index tracks it)
        assert lean[-1][-1][0] == page[-1].position
    assert rows(lean) == rows(single) == rows(general)
    # a run counts each of its events: the rows' event counts hold every record
    counted = sum(
        item.events if type(item) is Touched else 1 for batch in lean for _, item in batch
    )
    assert counted == len(records)
    if not spoil:  # a sound log's light events do come as runs
        assert sum(len(batch) for batch in lean) < len(records)


def test_a_plaintext_page_reads_the_stream_before_it_only_for_an_unchecked_record(
    log: list[RecordedEvent],
) -> None:
    """Without ``checked``, a page whose stream's first record has no checksum (and is not
    its first event) asks for the event before it; a sound page never does."""
    middle = len(log) // 2
    page = log[middle:]
    assert rows([index_reading.index_batch(CODEC, page)]) == rows(
        [index_reading.index_batch(CODEC, page, checked_of(log, middle))]
    )
    first = next(i for i, r in enumerate(page) if r.version > 1)
    spoiled = list(page)
    spoiled[first] = damaged(page[first], "strip")
    with pytest.raises(index_reading._NeedsChecked):
        index_reading.index_batch(CODEC, spoiled)

"""For each target of the benchmark, what would close its gap when it is missed: the text
REPORT.md shows under the target's profile (:mod:`bench.report`)."""

from __future__ import annotations

#: what would close each target's gap, shown under a missed target with its profile
GAPS: dict[str, str] = {
    "a1": (
        'With "boundary" the awaited `set_state` calls are buffered and made durable together '
        "(at the buffer bound of 1,000 events, and at the end of the attempt before "
        "`result()`), so the commits per operation (table (a)) are a small fraction of one "
        "and the rate is bound by the engine's Python per operation, not by the disk: "
        "checking and encoding the value, building the domain event, applying it to the "
        "aggregate and the per-operation bookkeeping of the recorder (the profile's "
        "stepsource functions). Closing it: less work per buffered operation (one walk and one "
        "encoding of each value, no per-operation await on the buffer when no commit is due). "
        "The ratio divides a rate bound by Python by one bound by the disk's fsync, so a faster "
        "disk lowers it with no change of code: the raw loop has measured from about 6,500 to "
        "10,400 commits/s on this machine in full runs, while this rate stayed at 60,000 to "
        "68,000 `set_state`/s."
    ),
    "a2": (
        'With "each" every awaited `set_state` is one durable SQLite transaction, as in '
        "the raw loop, so the floor is the raw 1-row commit rate. A lone commit following "
        "one of the same stream is written at once in the event loop's thread: no "
        "hand-off to the writer thread, no pass of the loop gathering a batch, no "
        "busy-timeout switching. Sampled without a profiler's distortion (py-spy), about "
        "three quarters of each operation is then the SQLite transaction itself (BEGIN, "
        "the version and lease lookups, the INSERT, the COMMIT and its fsync): the "
        "adapter alone appends one event in about 180 us where the raw loop's three "
        "statements take 150 to 160 us, so 0.7x of the floor leaves about 40 us per "
        "operation for everything else, and the engine's Python between the handler's "
        "call and the commit (recording the event, its checksum and encoding, the "
        "recorder's commit) takes about 80 us. Such a commit is written without a "
        "suspension, so it now skips the shielded cancel scope an awaited commit needs "
        "(`Backend.append_now`): the scope cost about a fifth of the engine's CPU per "
        "commit (+6% rate, CPU -8% in interleaved A/B). Closing it: an engine path per "
        "commit of a few tens of microseconds, which this Python design (a domain event, an "
        "aggregate and a commit object per operation) does not reach; the ratio also moves "
        "with the disk, since the engine's share is fixed and the fsync's is not."
    ),
    "a3": (
        "A `ctx.do` result is a boundary: one durable commit each, like a DBOS step, so "
        "the floor is the raw 1-row commit rate and a multiple of DBOS is possible only "
        "as far as DBOS spends more than one commit's time per step. Beyond a2's commit "
        "path, the workload's synchronous body runs in one of the worker's body threads "
        "(a sync body may block, and a blocking body must not stop the event loop). As the "
        "worker runs no other execution, the loop's thread waits for the body in place (up "
        "to 0.3 ms) instead of going back to epoll: one thread wake-up each way and no pass "
        "of the loop, which took about 50 to 70 us off each `ctx.do` (interleaved runs: "
        "about 400 to 340 us). What remains of the hop is the two wake-ups (about 45 us "
        "for a bare thread ping-pong here) and the engine's Python per commit (a2). "
        "Closing it: only an `async def` body avoids the hop (the same loop runs about "
        "3,400 no-op `ctx.do`/s with an async body); a synchronous body is not run on the "
        "event loop, by design. Where the hop's cost lies, measured on this host: the bare "
        "ping-pong takes 45 to 50 us with the two threads on different cores and 21 us with "
        "both pinned to one (taskset), and the same sequential no-op `ctx.do` on memory:// "
        "runs 6,600 to 7,100/s across cores against 10,000 to 14,000/s on one: most of it is "
        "waking a thread on the other core (an inter-processor interrupt, dear in a virtual "
        "machine), twice per `ctx.do`. A body waited for in place now runs on the loop "
        "thread's core (engine/affinity.py): +20% on this workload and +51% on memory:// "
        "(interleaved A/B, 6 pairs each). Its commit skips the shielded scope as a2's does: "
        "+6%, CPU -7% (8 pairs)."
    ),
    "b1": (
        'With "boundary" each of the 200 executions makes its 50 writes durable in the commit '
        "that ends its attempt, so the transactions are large and few (events per commit in "
        "table (b)) and SQLite is not the bound: the event loop thread is (the profile). "
        "Per event the engine builds, checks, encodes and applies a domain event; the raw "
        "loop inserts pre-built tuples. Closing it: less Python per event (one walk and one "
        "encoding per value, mutators applied without the generic event machinery) and less "
        "per execution (lease, start, completion, the handle's wake-up)."
    ),
    "b2": (
        'With "each" every awaited write waits for a commit; concurrent writers share one '
        "(group commit, events per commit in table (b)), so the bound is again the Python per "
        "event and per commit on the event loop (the profile), plus the wake-up of every "
        "waiting handler after each commit. Closing it: larger groups per commit and the "
        "per-event savings of b1. Group commits are written in the event loop's thread while "
        "writes are quick (see c2): +8 to 15% in interleaved runs."
    ),
    "r1": (
        "The batch handler makes one commit per `ctx.do` (each carries the item's buffered "
        "state write and, every 10 items, the checkpoint) plus the start and the end, so its "
        "floor is the raw 1-row rate divided by those commits (table (r)). A gap to the floor "
        "is the per-commit critical path of a2/a3 and the Python of the buffered operations "
        "(the profile); a DBOS workflow with a step per item also makes one commit per step, "
        "so 5x DBOS needs stepsource's commit path to be several times cheaper than DBOS's, "
        "which the floor allows only if DBOS stays far from it. Each `ctx.do` body is "
        "waited for in place on the loop thread's core (see a3): +9% (interleaved A/B)."
    ),
    "r2": (
        "50 at a time the commits of different executions are shared (group commit), so the "
        "bound moves to the event loop's Python per operation and per commit (the profile): "
        "the same savings as b1 and b2 close it."
    ),
    "c1": (
        "An empty step is two commits (the start: StepScheduled, StepLeased, StepStarted with "
        "the queue row leased to this worker; the end: the completion), so its floor is half "
        "the raw 1-row rate (table (c) shows the commits counted in the run). A gap to the "
        "floor is the per-execution Python: validating the input, building and encoding the "
        "events, the actor and the handle's wake-up (the profile): about 600 us of the event "
        "loop's CPU per execution. The end of each execution also made a lease call that "
        "found nothing (a write transaction on the SQLite writer): an end now leases again "
        "only when work may wait for its slot, +35% executions/s one at a time (interleaved "
        "A/B). Against DBOS and Temporal the same floor bounds what any durable start and "
        "durable result can reach: DBOS writes about as many commits per one-step workflow."
    ),
    "c2": (
        "50 at a time share commits, so the bound moves to the event loop (the profile): per "
        "execution the start validates the input, builds and encodes three events, the actor "
        "runs the handler and records the outcome, the handle is woken. The read-model runner "
        "no longer reads this process's commits back (it took about a quarter of the CPU: "
        "they are folded from the index feed, +10 to 13% in interleaved runs); what it still "
        "does per execution is the index's SQLite write. Closing it: the per-event savings "
        "of b1 and less per-execution work (fewer objects per start). A group commit is now "
        "written in the event loop's thread while writes are quick: handed to the writer "
        "thread, a batch waited for the GIL after each of its statements while the loop ran "
        "other executions' Python (a median 2 ms to write a batch whose fsync took 0.2 ms, 0.3 "
        "ms before the thread started it, the loop idle about a quarter of the time); in the "
        "loop, +13% executions/s and 7.6% less CPU (10 interleaved pairs)."
    ),
    "d1": (
        "A full replay reads every stored event and folds it; the eventsourcing library "
        "decodes each into a domain object with its JSON transcoder. A query of the "
        "aggregate parses in full only the events whose fold changes more than the version "
        "and time (state writes, checkpoints, lifecycle); the rest (history entries, recorded "
        "values) are checked (checksum) and their time read from the bytes, a run of them "
        "folded as one. The adapter checks the versions for a gap from the first and last "
        "only, and a stream's read does not read its id back for every row (+6 to 8% in an "
        "interleaved A/B). Measured on a 10,000-event execution: the read about 40% of the "
        "time, the decode 55%, the fold 4%; the read is Python building rows under the GIL "
        "(run beside the decode in a thread, it saved nothing), and the cyclic garbage "
        "collector takes about 4% (8 to 15% at 100,000 events). Both jobs run interleaved "
        "in rounds, so a slow spell of the machine lands on both sides of the ratio. What is "
        "left is the regex, CRC and time parse of each light event and orjson's parse of the "
        "state writes. Closing it: rows built in C (a row shape the driver returns as is), "
        "the time of a run's last event only, parsed once per run."
    ),
    "d3": (
        "A resuming worker must read the open attempt's events (it re-runs that attempt), but "
        "everything before the attempt can come from the latest snapshot. When the resume "
        "time grows with the earlier attempts, the load reads the whole stream (or the "
        "history of earlier attempts) instead of the snapshot and the open attempt's tail: "
        "the profile shows the load's share. Closing it: load the snapshot at or below the "
        "open attempt's start and only the events after it, with `ctx.history` reading older "
        "entries only when asked."
    ),
    "e": (
        "A rebuild of this size reads the log in helper processes, one per core: each reads "
        "ranges of positions, decodes the indexed events in full and, for the others, checks "
        "each checksum and reads each time from the stored bytes; the rebuilding process "
        "folds their pages in log order (about 1.2 us of its own CPU per event: decoding the "
        "indexed events again from the JSON a helper sends, and the index's SQLite writes). "
        "Per event a helper spends about 1.3 us reading rows and 2 us checking them, and "
        "each takes about 0.35 s to start (importing stepsource). Alone (one core, "
        "`rebuild_processes=0`) a rebuild runs about 250,000 events/s. Closing a miss: a "
        "lighter start for the helpers (the public API imported lazily), or the events the "
        "index does not read aggregated by the database."
    ),
    "f": (
        "Suspended executions hold no task and almost no Python objects in the worker (the "
        "Python heap above is a few MB). The RSS is the interpreter with stepsource's "
        "imports (table (f): an idle interpreter that only imported stepsource and its "
        "dependencies is most of the 50 MB by itself) plus what stays resident after the "
        "burst of starting the executions. SQLite's statement caches were 7 MB of that "
        "until the index and the group commit looked a batch's executions up with one JSON "
        "array instead of a statement per batch size (64.3 -> 52.9 MB at 100,000). What "
        "remains is allocator memory the burst leaves mapped: Python's object arenas grow "
        "from 17 to 23 MB while a few objects keep each arena in use, and glibc's per-thread "
        "heaps keep their free chunks (malloc_trim, which the worker calls when it goes "
        "idle, returns only whole free pages). With 20 workers instead of 200 the same "
        "burst leaves 4 MB less. A worker now imports pydantic only for a step with typed "
        "inputs or a typed return (pydantic and its schema machinery were about 9 MB of the "
        "RSS: 53.6 -> 45.4 MB at 100,000 for this workload's parameterless step); a worker "
        "whose steps take typed inputs pays them on top. Closing the rest: fewer objects "
        "alive per running actor at the peak."
    ),
    "g": (
        'On NATS with "each" each commit is one publish awaited for its ack, as in the raw '
        "loop, and a commit of a leased actor must also know that it still holds the lease "
        "(the queue is another stream: JetStream cannot check a condition across two streams "
        "in one publish; commits waiting together share one probe). What remains by the "
        "profile is the engine's per-event Python (b1), the read-model runner reading every "
        "new event back, and this process and nats-server sharing two cores."
    ),
    "h1": (
        "Each `ctx.do` is one durable commit: one EVALSHA of the commit script (4 arguments: "
        "prefix, the commit's head as one JSON argument, the event's data; a bare integer "
        "answer) answered after the server's fsync, as in the raw loop, with redis-py's C "
        "parser and packer (hiredis) on both sides. What remains, measured as CPU per "
        "operation on the same server (interleaved runs, load 5 to 17): raw redis-py about "
        "180 us per call, stepsource about 440 us per `ctx.do`, of which the engine alone "
        "(the same handler on memory://) is about 140 us (see a3: the body's trip to a worker "
        "thread, recording, encoding) and the backend about 40 us beyond redis-py's own; and "
        "the server does three writes per commit (position counter, global log, the "
        "execution's list) where the raw script does one. Closing it: less engine Python "
        "per operation (a3), then positions taken from the global log itself (one write "
        "fewer). The body's thread hop is the whole miss: the same loop with an `async def` "
        "body runs about 2,230 `ctx.do`/s against 3,140 raw calls/s (0.71x), one EVALSHA per "
        "`ctx.do` either way (the server's command counts); the sync body added about 90 us, "
        "of which waiting for it in place (the only execution running: no pass of the event "
        "loop to take its result) took back about 30 to 50 us (0.57x to 0.63x). The backend's "
        "own share was then cut: each call bounded by asyncio.timeout instead of redis-py's "
        "socket timeout (whose send path made a task per command), and a lone call sent on a "
        "connection kept for it instead of the client's per-command path (pool, retries): "
        "about 45 us less client CPU per `ctx.do` in all. The ratio also moves with the "
        "server's fsync: the faster the disk, the larger the engine's fixed share (the raw "
        "loop ran 3,300 to 5,200 calls/s on this machine on different days)."
    ),
    "h2": (
        "Concurrent commits travel together: the leader of a flush waits a few event-loop "
        "turns for the callers the last flush woke (so a round of 200 executions is one "
        "flush of 200, not 1 + 199), and a flush is one EVALSHA of the commit script "
        "carrying every commit (one round trip, one fsync, one script run; a refused or "
        "failed commit fails alone). What remains is the engine's Python per commit: about "
        "140 us of client CPU per event (engine start included) against about 17 us per "
        "pipelined raw call, on two cores shared with redis-server; the read models' "
        "catch-up reading the new events back is a few per cent of it. Closing it: the "
        "engine's per-commit Python (see b2, g)."
    ),
    "p1": (
        "Each `ctx.do` is one durable commit, as each raw commit is, and the append is now one "
        "call of the schema's function: one round trip and one WAL flush (about 70 us of "
        "server time; it was seven statements), counted at exactly one statement per "
        "`ctx.do`. On a quiet machine the sequential rate about doubled with it; what still "
        "separates it from the raw loop is Python on the client: the async driver's statement "
        "path (about twice a bare `SELECT 1`'s client CPU), the group-commit bookkeeping, and "
        "the engine's work per sub-step, including the hop to a worker thread that runs the "
        "workload's synchronous body (see a3). On a loaded machine (the profile: the event "
        "loop idle most of the time) every one of those wake-ups waits for a core, and the hop "
        "adds two per `ctx.do` where the raw loop has none. Closing it: no thread hop for a "
        "trivial synchronous body, less Python per sub-step in the engine, and a leaner async "
        "statement path (psycopg registers and unregisters the socket with the event loop on "
        "every statement)."
    ),
    "p2": (
        "An empty step is two commits (its start, its end) on either engine; what separates "
        "the two is the Python around them on the client: stepsource's per-execution work "
        "(validating the input, building and encoding three events, the local lease, the "
        "actor, the completion, the handle's wake-up; see c1) against DBOS's. Both rates move "
        "with the machine: interleaved A/B runs of this session's code against the previous "
        "session's on one server gave the same range (about 330 to 500 executions/s), so a "
        "run's ratio moves with the load and the disk as much as with the code. Each end also "
        "made a lease statement that found nothing (a round trip per execution); an end now "
        "leases again only when work may wait for its slot (+15% in interleaved A/B runs). "
        "Closing the rest: less Python per execution (c1, c2)."
    ),
    "p3": (
        "Fifty executions at a time share group commits (a few hundredths of an append call "
        "per execution: each call writes the commits of dozens of executions), so the database "
        "is not the bound; the event loop thread is (the profile): the engine's Python per "
        "execution (scheduling, the aggregate and its encoding, the local lease, the actor, "
        "the completion, the handle's wake-up) and the read-model runner folding every event "
        "into the executions table (from the index feed: this process's commits are no "
        "longer read back, but each batch is still a transaction of its own on the server). "
        "Closing it: less Python per execution in the engine (see c2); DBOS's own workers "
        "also run beside it on the same two cores."
    ),
    "p4": (
        "The batch handler makes one commit per `ctx.do` plus the start and the end, one after "
        "the other, so it pays p1's cost per commit about 27 times; see p1."
    ),
    "p5": (
        "As p3: the commits of 50 executions share each append call, and the bound is the "
        "engine's Python per sub-step and per buffered operation on the event loop (the "
        "profile); see p1 and b1."
    ),
    "o1": (
        "Tracing makes a span per attempt and per `ctx.do` body and metrics observe each "
        "commit, attempt and body: Python per operation on the event loop, beside the "
        "engine's own. Measured as CPU on this handler (alternating in one process): 4.9 ms "
        "per execution plain, 6.9 ms observed; tracing adds about 60 us per item (the SDK's "
        "start_span and end alone are about 14 us a span) and metrics about 15 us. The wall "
        "ratio is diluted by the fsync of each commit, so it moves with the disk: 0.89x and "
        "0.77x in two full runs of nearly the same code, about 0.71x as CPU. Closing it: "
        "spans and observations batched per commit instead of per operation, and the "
        "OpenTelemetry SDK's span processor kept off the hot path. Measured again on memory:// "
        "(CPU, alternating in one process): tracing adds about 43 us per item and 210 us per "
        "execution (its start and attempt spans); a profile diff puts nearly all of it in the "
        "SDK (start_span, the ReadableSpan copy made at end, the sampler, the processor's "
        "on_end), not in the interceptor."
    ),
    "u1": (
        "The list's first page is one page of the executions index (a `LIMIT 51` query by "
        "position) and its counts and chart: counted by the index's database, exact, and "
        "therefore a walk of an index per count (statuses; creation times; completion times "
        "of the completed and of the failed), each proportional to the number of "
        "executions. Closing it for much larger logs: counters kept by the index's fold "
        "(per step and status, and per hour for the chart) in the same transaction as the "
        "rows, so that a count is a lookup, whatever the number of executions."
    ),
    "u2": (
        "A page of the timeline reads its 200 events and the execution record at the page's "
        "first version (from the nearest snapshot of the ladder); the rest is rendering: "
        "each event made into a row (its fields as plain JSON) and the template. Closing it: "
        "fewer fields turned into JSON per row (only what the row shows), and the record at "
        "the page's start read once per page rather than folded from a snapshot."
    ),
    "u3": (
        "A move of the scrubber is one load (`engine.version_view`: the aggregate at the "
        "version before from the nearest rung of the snapshot ladder, then the event itself "
        "folded on) plus a window of recent events for the history. With the handler's "
        "commits of 1,000 buffered events, rungs exist every 1,000 versions, so the load "
        "looks down through up to ten empty rungs (a point read each, a hand-off to the "
        "SQLite thread) and folds up to 1,000 events; on a loaded machine the hand-offs "
        "dominate (the profile's idle and lock time). Closing it: rungs inside large "
        "commits (the aggregate at each multiple of `snapshot_every` kept while a commit's "
        "events are applied), which bounds the fold to `snapshot_every` events and the "
        "search to one read; or a backend query for the newest rung at or below a version."
    ),
}

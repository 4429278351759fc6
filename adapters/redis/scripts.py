"""The Lua scripts the Redis server runs: each is atomic (the server runs nothing else
meanwhile), so a commit's version check, lease check, events, inbox deletions, posts and
queue update happen all together or not at all.

Every script takes the key prefix as ``ARGV[1]`` and builds key names as
:class:`~stepsource.adapters.redis.keys.Keys` does. Numbers cross into Lua as decimal
strings and are written back with ``string.format('%d')`` (Lua numbers are doubles: exact
below 2**53 ms, about 285,000 years; the key-value store's expiries, which the contract
allows up to 2**63, are compared as decimal strings instead).

Times are the caller's (``now_ms`` arguments): no script reads the server's clock.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

__all__ = [
    "ALL",
    "COMMIT",
    "KV_WRITE",
    "LEASE",
    "POST",
    "READ_STREAM",
    "RELEASE",
    "RENEW",
    "SAVE_SNAPSHOT",
    "Script",
]


@dataclass(frozen=True, slots=True)
class Script:
    """A script's name (for messages), its source and the SHA1 the server knows it by."""

    name: str
    source: str
    sha: str


def _script(name: str, body: str) -> Script:
    source = _COMMON + body
    return Script(name, source, hashlib.sha1(source.encode()).hexdigest())


_COMMON = r"""
local P = ARGV[1]
local function fmt(n) return string.format('%d', n) end
local function evk(s) return P .. ':ev:{' .. s .. '}' end
local function rowk(s) return P .. ':q:{' .. s .. '}' end
local function ink(s) return P .. ':in:{' .. s .. '}' end
local function duek(step) return P .. ':due:' .. step end
-- the queue index: a row may be leased from max(due, exp + 1) while leased, else from due
local function index(s, step, due, owner, exp)
  local at = due
  if owner then at = math.max(due, exp + 1) end
  redis.call('ZADD', duek(step), fmt(at), s)
end
-- an inbox item, and the stream's row due now if it was due later (a sleeper wakes)
local function post(s, kind, name, data, now)
  local id = redis.call('INCR', P .. ':inid')
  redis.call('XADD', ink(s), fmt(id) .. '-0', 'k', kind, 'n', name, 'd', data, 't', now)
  local row = redis.call('HMGET', rowk(s), 'step', 'due', 'owner', 'exp')
  if row[1] and tonumber(row[2]) > tonumber(now) then
    redis.call('HSET', rowk(s), 'due', now)
    index(s, row[1], tonumber(now), row[3], tonumber(row[4]))
  end
  return id
end
-- byte order of two strings (UTF-8 byte order is code point order, as Python sorts)
local function before(a, b)
  local n = math.min(#a, #b)
  for k = 1, n do
    local x, y = a:byte(k), b:byte(k)
    if x ~= y then return x < y end
  end
  return #a < #b
end
-- compare two canonical decimal integers of any size: -1, 0 or 1
local function cmpdigits(a, b)
  if #a ~= #b then return (#a < #b) and -1 or 1 end
  if a == b then return 0 end
  return before(a, b) and -1 or 1
end
local function cmpint(a, b)
  local na, nb = a:byte(1) == 45, b:byte(1) == 45
  if na and not nb then return -1 end
  if nb and not na then return 1 end
  if na then return -cmpdigits(a:sub(2), b:sub(2)) end
  return cmpdigits(a, b)
end
"""

#: ARGV: prefix, the commits' heads (a JSON array, one per commit), then the commits' blobs in
#: order (each commit's event data, then its outbox data). A head is
#: ``[stream, expected version, [owner] or [], [topic per event], [consumed id...],
#: [[stream, kind, name, now] per outbox item], [] or [kind, step, priority, due, now, owner,
#: lease expiry]]``, numbers to store as decimal strings (written back as sent).
#: Returns one answer per commit: the last position of its stream (an integer), or
#: {'version', current version} or {'lease', has holder (1/0), holder}, or {'error', message}
#: if the server failed it. Each commit is checked and written on its own (a refused one
#: writes nothing and leaves the others alone); the whole batch runs as one atomic step.
COMMIT = _script(
    "commit",
    r"""
local heads = cjson.decode(ARGV[2])
local function commit(h, b)
  local s = h[1]
  local ev = evk(s)
  local current = redis.call('LLEN', ev)
  if current ~= h[2] then return {'version', current} end
  local owner = h[3][1]
  if owner then
    local holder = redis.call('HGET', rowk(s), 'owner')
    if holder ~= owner then
      if holder then return {'lease', 1, holder} end
      return {'lease', 0, ''}
    end
  end
  local topics = h[4]
  local n = #topics
  local last = false
  if n > 0 then
    last = redis.call('INCRBY', P .. ':pos', n)
    local version = current
    for k = 1, n do
      version = version + 1
      local pos = fmt(last - n + k)
      redis.call('XADD', P .. ':log', pos .. '-0', 's', s, 'v', fmt(version), 't', topics[k],
        'd', ARGV[b])
      redis.call('RPUSH', ev, pos)
      b = b + 1
    end
  end
  local consumed = h[5]
  if #consumed > 0 then
    local box = ink(s)
    for k = 1, #consumed do redis.call('XDEL', box, consumed[k] .. '-0') end
    if redis.call('XLEN', box) == 0 then redis.call('DEL', box) end
  end
  local outbox = h[6]
  for k = 1, #outbox do
    local o = outbox[k]
    post(o[1], o[2], o[3], ARGV[b], o[4])
    b = b + 1
  end
  local work = #outbox > 0
  local q = h[7]
  local kind = q[1]
  if kind then
    local row = rowk(s)
    local old = redis.call('HGET', row, 'step')
    if old then redis.call('ZREM', duek(old), s) end
    redis.call('DEL', row)
    if kind ~= 'done' then
      local step, prio, due, now = q[2], q[3], q[4], q[5]
      if kind == 'suspend' and redis.call('XLEN', ink(s)) > 0
          and tonumber(now) < tonumber(due) then
        due = now
      end
      if kind == 'lease' then
        redis.call('HSET', row, 'step', step, 'prio', prio, 'due', due, 'owner', q[6], 'exp', q[7])
        index(s, step, tonumber(due), q[6], tonumber(q[7]))
      else
        redis.call('HSET', row, 'step', step, 'prio', prio, 'due', due)
        index(s, step, tonumber(due), false, 0)
        work = true
      end
    end
  end
  -- announced when the queue row changed (runnable, suspended, leased, finished) or an outbox
  -- was posted; a commit in the middle of an execution is found by polling
  if kind or #outbox > 0 then
    redis.call('PUBLISH', P .. ':wake', (work and 'w:' or 'c:') .. s)
  end
  return last or tonumber(redis.call('LINDEX', ev, -1) or '0')
end
local answers = {}
local b = 3
for j = 1, #heads do
  local h = heads[j]
  local ok, answer = pcall(commit, h, b)
  if ok then
    answers[j] = answer
  else
    if type(answer) == 'table' then answer = answer.err or answer.message end
    answers[j] = {'error', tostring(answer)}
  end
  b = b + #h[4] + #h[6]
end
return answers
""",
)

#: ARGV: prefix, stream, kind, name, data, now. Returns the item id.
POST = _script(
    "post",
    r"""
local id = post(ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6])
redis.call('PUBLISH', P .. ':wake', 'w:' .. ARGV[2])
return id
""",
)

#: ARGV: prefix, a number. Raises the inbox item counter to it (never lowers it).
RESERVE_INBOX_IDS = _script(
    "reserve_inbox_ids",
    r"""
local wanted = tonumber(ARGV[2])
if tonumber(redis.call('GET', P .. ':inid') or '0') < wanted then
  redis.call('SET', P .. ':inid', ARGV[2])
end
return 1
""",
)

#: ARGV: prefix, from index, to index (of the stream's list). Returns a flat list of
#: position, topic, data per event.
READ_STREAM = _script(
    "read_stream",
    r"""
local out = {}
for _, pos in ipairs(redis.call('LRANGE', evk(ARGV[2]), ARGV[3], ARGV[4])) do
  local found = redis.call('XRANGE', P .. ':log', pos .. '-0', pos .. '-0')
  if not found[1] then
    return redis.error_reply('STEPSOURCE missing event at position ' .. pos)
  end
  local fields = found[1][2]
  out[#out + 1] = pos
  out[#out + 1] = fields[6]
  out[#out + 1] = fields[8]
end
return out
""",
)

#: ARGV: prefix, worker, now, lease expiry, limit, step ids... Returns a flat list of
#: stream, step, priority per lease, highest priority first, then earliest due.
LEASE = _script(
    "lease",
    r"""
local worker, now, exp, limit = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local found = {}
for j = 6, #ARGV do
  local step = ARGV[j]
  for _, s in ipairs(redis.call('ZRANGEBYSCORE', duek(step), '-inf', now)) do
    local row = redis.call('HMGET', rowk(s), 'prio', 'due')
    found[#found + 1] = {tonumber(row[1]), tonumber(row[2]), s, step, row[1]}
  end
end
table.sort(found, function(a, b)
  if a[1] ~= b[1] then return a[1] > b[1] end
  if a[2] ~= b[2] then return a[2] < b[2] end
  return before(a[3], b[3])
end)
local out = {}
local e = tonumber(exp)
for k = 1, math.min(limit, #found) do
  local c = found[k]
  redis.call('HSET', rowk(c[3]), 'owner', worker, 'exp', exp)
  index(c[3], c[4], c[2], worker, e)
  out[#out + 1] = c[3]
  out[#out + 1] = c[4]
  out[#out + 1] = c[5]
end
return out
""",
)

#: ARGV: prefix, worker, lease expiry, streams... Returns the streams still held.
RENEW = _script(
    "renew",
    r"""
local worker, exp = ARGV[2], ARGV[3]
local e = tonumber(exp)
local held = {}
for j = 4, #ARGV do
  local s = ARGV[j]
  local row = redis.call('HMGET', rowk(s), 'owner', 'step', 'due')
  if row[1] == worker then
    redis.call('HSET', rowk(s), 'exp', exp)
    index(s, row[2], tonumber(row[3]), worker, e)
    held[#held + 1] = s
  end
end
return held
""",
)

#: ARGV: prefix, worker, stream, has due (1/0), due. Returns 1 if the lease was held.
RELEASE = _script(
    "release",
    r"""
local worker, s = ARGV[2], ARGV[3]
local row = redis.call('HMGET', rowk(s), 'owner', 'step', 'due')
if row[1] ~= worker then return 0 end
redis.call('HDEL', rowk(s), 'owner', 'exp')
local due = row[3]
if ARGV[4] == '1' then
  due = ARGV[5]
  redis.call('HSET', rowk(s), 'due', due)
end
index(s, row[2], tonumber(due), false, 0)
redis.call('PUBLISH', P .. ':wake', 'w:' .. s)
return 1
""",
)

#: ARGV: prefix, stream, version, topic, data. Keeps a newer stored snapshot.
SAVE_SNAPSHOT = _script(
    "save_snapshot",
    r"""
local key = P .. ':snap:{' .. ARGV[2] .. '}'
local stored = redis.call('HGET', key, 'v')
if stored and tonumber(stored) > tonumber(ARGV[3]) then return 0 end
redis.call('HSET', key, 'v', ARGV[3], 't', ARGV[4], 'd', ARGV[5])
return 1
""",
)

#: ARGV: prefix, key, expected revision ('' for absent, 'any' for an unconditional put),
#: now, data, expiry ('' for none), native TTL in ms ('' for none).
#: Returns the new revision, or nil if refused.
KV_WRITE = _script(
    "kv_write",
    r"""
local key = P .. ':kv:' .. ARGV[2]
local expected, now = ARGV[3], ARGV[4]
if expected ~= 'any' then
  local row = redis.call('HMGET', key, 'r', 'x')
  local live = row[1] and ((not row[2]) or cmpint(row[2], now) > 0)
  if expected == '' then
    if live then return false end
  elseif (not live) or row[1] ~= expected then
    return false
  end
end
local rev = redis.call('INCR', P .. ':kvrev')
redis.call('DEL', key)
if ARGV[6] == '' then
  redis.call('HSET', key, 'd', ARGV[5], 'r', fmt(rev))
else
  redis.call('HSET', key, 'd', ARGV[5], 'r', fmt(rev), 'x', ARGV[6])
end
if ARGV[7] ~= '' then redis.call('PEXPIRE', key, ARGV[7]) end
return rev
""",
)

ALL = (
    COMMIT,
    POST,
    RESERVE_INBOX_IDS,
    READ_STREAM,
    LEASE,
    RENEW,
    RELEASE,
    SAVE_SNAPSHOT,
    KV_WRITE,
)

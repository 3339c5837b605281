"""The Redis keys and Lua scripts of jobs (the other half of store.py).

A job's keys share its dataset's hash tag, so every script touches one slot::

    P:jobs                              HASH   job name -> dataset (the index)
    P:ds:{D}:jobs                       SET    names of the dataset's jobs (removed with it)
    P:ds:{D}:job:<job>                  HASH   config, status, epoch, next, counters
    P:ds:{D}:job:<job>:leases           ZSET   "epoch:index" -> lease expiry (ms, Redis clock)
    P:ds:{D}:job:<job>:lease            HASH   "epoch:index" -> "lease id|worker"
    P:ds:{D}:job:<job>:acked:<epoch>    STRING bitmap of acked batch indices
    P:ds:{D}:job:<job>:ackcount         HASH   epoch -> batches acked
    P:ds:{D}:job:<job>:workers          HASH   "<worker>:<counter>" -> value

Every handed-out batch is either leased (in the ZSET) or acked (its bit set),
and all transitions happen inside one script, so any number of service
replicas can serve a job and any process can die at any moment: an expired
lease is simply handed out again, and an ack counts once.
"""

from __future__ import annotations

from .store import Keys

# Shared Lua: time, lease bookkeeping and the ack of one lease.
# KEYS[1]: job hash, KEYS[2]: leases zset, KEYS[3]: lease hash, KEYS[4]: workers hash, KEYS[5]: ackcount hash
_PRELUDE = """
local job, leases, leasemap, workers, ackcount = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local function finish_if_done()
  local epochs = tonumber(redis.call('HGET', job, 'epochs'))
  if epochs < 0 then return false end
  local epoch = tonumber(redis.call('HGET', job, 'epoch'))
  local nxt = tonumber(redis.call('HGET', job, 'next'))
  local bpe = tonumber(redis.call('HGET', job, 'bpe'))
  if epoch == epochs - 1 and nxt >= bpe and redis.call('ZCARD', leases) == 0 then
    redis.call('HSET', job, 'status', 'done', 'finished_at', now)
    return true
  end
  return false
end

-- ack one lease id 'epoch:index:attempt:token'; returns 'acked', 'late', 'duplicate' or 'invalid'
local function ack(lease, worker, size)
  local e, i, attempt = string.match(lease, '^(%d+):(%d+):(%d+):')
  if not e then return 'invalid' end
  e, i, attempt = tonumber(e), tonumber(i), tonumber(attempt)
  local epoch = tonumber(redis.call('HGET', job, 'epoch'))
  local nxt = tonumber(redis.call('HGET', job, 'next'))
  local bpe = tonumber(redis.call('HGET', job, 'bpe'))
  if e > epoch or i >= bpe or (e == epoch and i >= nxt) or attempt > tonumber(redis.call('HGET', job, 'attempts')) then
    return 'invalid'
  end
  local bitmap = job .. ':acked:' .. e
  if redis.call('SETBIT', bitmap, i, 1) == 1 then return 'duplicate' end
  local member = e .. ':' .. i
  local current = redis.call('HGET', leasemap, member)
  local late = current == false or string.sub(current, 1, #lease + 1) ~= lease .. '|'
  redis.call('ZREM', leases, member)
  redis.call('HDEL', leasemap, member)
  redis.call('HINCRBY', ackcount, e, 1)
  redis.call('HINCRBY', job, 'acked', 1)
  redis.call('HINCRBY', job, 'acked_sequences', size)
  if late then redis.call('HINCRBY', job, 'late_acks', 1) end
  redis.call('HINCRBY', workers, worker .. ':acked', 1)
  redis.call('HINCRBY', workers, worker .. ':acked_sequences', size)
  redis.call('HSET', workers, worker .. ':last', now)
  redis.call('HSETNX', workers, worker .. ':first', now)
  return late and 'late' or 'acked'
end

-- the size of batch i (the last one of an epoch may be short)
local function batch_size(i)
  local b = tonumber(redis.call('HGET', job, 'batch_size'))
  local n = tonumber(redis.call('HGET', job, 'n'))
  return math.min(b, n - i * b)
end
"""

# KEYS[1..5]: as in the prelude; ARGV[1]: worker, ARGV[2]: random token for the lease id,
# ARGV[3..]: lease ids to ack first (the batches the worker finished)
# returns {state, ...}:
#   {'lease', epoch, index, lease id, expiry ms, redelivered 0|1, job instance id, acks...}
#   {'wait', retry after ms, job instance id, acks...}   (all handed out; leases or the epoch boundary pending)
# (the instance id is new for every created job, so callers can cache a job's config safely)
#   {'done'|'cancelled'|'missing', ...}
NEXT = _PRELUDE + """
if redis.call('EXISTS', job) == 0 then return {'missing'} end
local worker = ARGV[1]
local acks = {}
for a = 3, #ARGV do
  local e, i = string.match(ARGV[a], '^(%d+):(%d+):')
  acks[#acks + 1] = ack(ARGV[a], worker, e and batch_size(tonumber(i)) or 0)
end
finish_if_done()
local status = redis.call('HGET', job, 'status')
local instance = redis.call('HGET', job, 'instance')
if status ~= 'active' then return {status, 0, instance, unpack(acks)} end
local lease_ms = tonumber(redis.call('HGET', job, 'lease_ms'))

local function grant(e, i, redelivered)
  local attempt = redis.call('HINCRBY', job, 'attempts', 1)
  local lease = e .. ':' .. i .. ':' .. attempt .. ':' .. ARGV[2]
  local member = e .. ':' .. i
  redis.call('ZADD', leases, now + lease_ms, member)
  redis.call('HSET', leasemap, member, lease .. '|' .. worker)
  redis.call('HINCRBY', job, 'handed', 1)
  redis.call('HINCRBY', workers, worker .. ':handed', 1)
  if redelivered == 1 then
    redis.call('HINCRBY', job, 'redelivered', 1)
    redis.call('HINCRBY', workers, worker .. ':redelivered', 1)
  end
  redis.call('HSET', workers, worker .. ':last', now)
  redis.call('HSETNX', workers, worker .. ':first', now)
  return {'lease', e, i, lease, now + lease_ms, redelivered, instance, unpack(acks)}
end

local expired = redis.call('ZRANGEBYSCORE', leases, '-inf', now, 'LIMIT', 0, 1)
if #expired > 0 then
  local e, i = string.match(expired[1], '^(%d+):(%d+)$')
  return grant(tonumber(e), tonumber(i), 1)
end
local epoch = tonumber(redis.call('HGET', job, 'epoch'))
local nxt = tonumber(redis.call('HGET', job, 'next'))
local bpe = tonumber(redis.call('HGET', job, 'bpe'))
if nxt >= bpe then
  local epochs = tonumber(redis.call('HGET', job, 'epochs'))
  local gated = redis.call('HGET', job, 'boundary') == 'ack'
    and tonumber(redis.call('HGET', ackcount, epoch) or '0') < bpe
  if gated or (epochs >= 0 and epoch + 1 >= epochs) then
    local first = redis.call('ZRANGE', leases, 0, 0, 'WITHSCORES')
    local retry = 100
    if #first > 0 then retry = math.max(20, math.min(1000, tonumber(first[2]) - now)) end
    return {'wait', retry, instance, unpack(acks)}
  end
  epoch = epoch + 1
  nxt = 0
  redis.call('HSET', job, 'epoch', epoch)
end
redis.call('HSET', job, 'next', nxt + 1)
return grant(epoch, nxt, 0)
"""

# KEYS[1..5]: as in the prelude; ARGV[1]: worker, ARGV[2..]: lease ids
# returns one status per lease ('acked', 'late', 'duplicate', 'invalid'), or {'missing'}
ACK = _PRELUDE + """
if redis.call('EXISTS', job) == 0 then return {'missing'} end
local out = {}
for a = 2, #ARGV do
  local e, i = string.match(ARGV[a], '^(%d+):(%d+):')
  out[#out + 1] = ack(ARGV[a], ARGV[1], e and batch_size(tonumber(i)) or 0)
end
finish_if_done()
return out
"""

# KEYS[1..5]: as in the prelude; ARGV[1..]: lease ids the worker gives back unacked
# returns how many were still leased under those ids (now due for immediate redelivery), -1: no such job
RELEASE = _PRELUDE + """
if redis.call('EXISTS', job) == 0 then return -1 end
local n = 0
for a = 1, #ARGV do
  local e, i = string.match(ARGV[a], '^(%d+):(%d+):')
  if e then
    local member = e .. ':' .. i
    local current = redis.call('HGET', leasemap, member)
    if current and string.sub(current, 1, #ARGV[a] + 1) == ARGV[a] .. '|' then
      redis.call('ZADD', leases, 0, member)
      n = n + 1
    end
  end
end
return n
"""

# KEYS[1]: job hash, KEYS[2]: job index, KEYS[3]: the dataset's job set, KEYS[4]: dataset meta
# ARGV[1]: job name, ARGV[2]: dataset, ARGV[3]: dataset uid, ARGV[4]: config hash, ARGV[5..]: field/value pairs
# returns {'created'}, {'exists'} (same config), {'conflict', dataset} or {'no-dataset'}
CREATE_JOB = """
if redis.call('HGET', KEYS[4], 'uid') ~= ARGV[3] then return {'no-dataset'} end
local owner = redis.call('HGET', KEYS[2], ARGV[1])
if owner and owner ~= ARGV[2] then return {'conflict', owner} end
if redis.call('EXISTS', KEYS[1]) == 1 then
  if redis.call('HGET', KEYS[1], 'config_hash') == ARGV[4] then return {'exists'} end
  return {'conflict', ARGV[2]}
end
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('SADD', KEYS[3], ARGV[1])
return {'created'}
"""

# KEYS[1]: job hash; returns 1 when the job was active and is now cancelled, 0 if it was not active, -1: no such job
CANCEL_JOB = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return -1 end
if status ~= 'active' then return 0 end
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
return 1
"""

# KEYS[1]: job hash, KEYS[2]: job index, KEYS[3]: the dataset's job set, KEYS[4..]: the job's other fixed keys
# ARGV[1]: job name; returns the number of keys removed
DELETE_JOB = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local epoch = tonumber(redis.call('HGET', KEYS[1], 'epoch'))
local removed = 0
for e = 0, epoch do removed = removed + redis.call('UNLINK', KEYS[1] .. ':acked:' .. e) end
for i = 4, #KEYS do removed = removed + redis.call('UNLINK', KEYS[i]) end
removed = removed + redis.call('UNLINK', KEYS[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('SREM', KEYS[3], ARGV[1])
return removed
"""


class JobKeys:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._datasets = Keys(prefix)

    def dataset_meta(self, dataset: str) -> str:
        return self._datasets.ds(dataset, "meta")

    @property
    def index(self) -> str:
        return f"{self.prefix}:jobs"

    def dataset_jobs(self, dataset: str) -> str:
        return self._datasets.ds(dataset, "jobs")

    def job(self, dataset: str, job: str) -> str:
        return self._datasets.ds(dataset, f"job:{job}")

    def lease_keys(self, dataset: str, job: str) -> list[str]:
        base = self.job(dataset, job)
        return [base, f"{base}:leases", f"{base}:lease", f"{base}:workers", f"{base}:ackcount"]

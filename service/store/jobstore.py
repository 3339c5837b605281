"""The Lua scripts of jobs (the other half of store.py; the keys they touch: jobkeys.py).

Every handed-out batch is either leased (in the ZSET) or acked (its bit set),
and all transitions happen inside one script, so any number of service
replicas can serve a job and any process can die at any moment: an expired
lease is simply handed out again, and an ack counts once.

**Lease ids** are ``epoch:index:attempt:instance:tag``. ``instance`` is new
for every created job, so ids of a deleted or re-created job are ``stale``.
``tag`` is two 64-bit HMAC-SHA1 truncations under a per-job secret (kept in
the job hash as the HMAC's inner and outer padded keys): one over
``epoch:index:attempt:instance`` (the service issued this id; else
``invalid``) and one over that and the worker's name (it was issued to this
worker; else ``not-owner``). So only the worker a lease was issued to can ack
or release it, and the original holder of an expired lease can still ack it
(``late``) if nobody has: it trained the batch.

**Rolled back.** The job's keys may go back to an earlier consistent state
(a failover that lost the master's last writes, a restart from an
append-only file that lost its unsynced tail) while workers hold leases
granted after it. Their acks still count (``late``, once each); one of a batch
ahead of the cursor is recorded in ``ahead``, and the cursor skips it when it
gets there, so only batches granted or acked in the lost window can be trained
twice. The hash's ``acked_top`` is the latest epoch acked ahead of the cursor's,
so deleting the job finds every acked bitmap.
An ack of a batch already acked (``duplicate``) ends any lease on it, and a
job is done once all its batches are acked, whatever its cursor says.
"""

from __future__ import annotations

from .lua import NOW_MS

# Shared Lua: time, lease ids, bookkeeping of workers, the ack of one lease.
# KEYS[1]: job hash, KEYS[2]: leases zset, KEYS[3]: lease hash, KEYS[4]: workers hash, KEYS[5]: ackcount hash,
# KEYS[6]: seen zset, KEYS[7]: requests hash, KEYS[8]: ahead set, KEYS[9..]: the acked bitmap of each lease id in
# ARGV, in order
_PRELUDE = NOW_MS + """
local job, leases, leasemap, workers, ackcount, seen, requests = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local ahead = KEYS[8]

-- done once every batch of every epoch is acked ('acked' counts each batch once), wherever the cursor is
local function finish_if_done()
  local f = redis.call('HMGET', job, 'epochs', 'bpe', 'acked', 'status')
  local epochs = tonumber(f[1])
  if epochs < 0 or f[4] ~= 'active' or tonumber(f[3]) < epochs * tonumber(f[2]) then return false end
  redis.call('HSET', job, 'status', 'done', 'finished_at', now)
  redis.call('DEL', leases, leasemap, requests, ahead)  -- nothing left to train: no lease is live any more
  return true
end

-- HMAC-SHA1 under the job's secret (its padded inner and outer keys), truncated to 64 bits
local kin, kout
local function mac(msg)
  if not kin then
    local k = redis.call('HMGET', job, 'mac_in', 'mac_out')
    kin, kout = k[1], k[2]
  end
  local inner = string.gsub(redis.sha1hex(kin .. msg), '..', function(h) return string.char(tonumber(h, 16)) end)
  return string.sub(redis.sha1hex(kout .. inner), 1, 16)
end

local function lease_id(e, i, attempt, instance, worker)
  local base = e .. ':' .. i .. ':' .. attempt .. ':' .. instance
  return base .. ':' .. mac(base) .. mac(base .. ':' .. worker)
end

-- a lease id issued to this worker for this job instance: 'ok', 'invalid', 'stale' or 'not-owner'
local function verify(lease, worker)
  local e, i, attempt, instance, tag = string.match(lease, '^(%d+):(%d+):(%d+):(%x+):(%x+)$')
  if not e or #tag ~= 32 or #e > 15 or #i > 15 then return 'invalid' end
  if instance ~= redis.call('HGET', job, 'instance') then return 'stale' end
  local base = e .. ':' .. i .. ':' .. attempt .. ':' .. instance
  if string.sub(tag, 1, 16) ~= mac(base) then return 'invalid' end
  if string.sub(tag, 17) ~= mac(base .. ':' .. worker) then return 'not-owner' end
  return 'ok', tonumber(e), tonumber(i)
end

-- the size of batch i (the last one of an epoch may be short)
local function batch_size(i)
  local b = tonumber(redis.call('HGET', job, 'batch_size'))
  local n = tonumber(redis.call('HGET', job, 'n'))
  return math.min(b, n - i * b)
end

-- who holds batch 'member' now: lease id, worker, request id (nil if nobody)
local function holder(member)
  local v = redis.call('HGET', leasemap, member)
  if not v then return nil end
  return string.match(v, '^([^|]*)|([^|]*)|([^|]*)$')
end

-- the lease of 'member' ends: a retry of the request that got it must not get it again
local function forget_request(member)
  local _, w, rid = holder(member)
  if rid and rid ~= '' then redis.call('HDEL', requests, w .. '|' .. rid) end
end

-- a live lease given back unused: due at once, and no request id answers with it any more
local function give_back(member, lease, by)
  forget_request(member)
  redis.call('HSET', leasemap, member, lease .. '|' .. by .. '|')
  redis.call('ZADD', leases, 0, member)
end

local function touch(worker)
  redis.call('ZADD', seen, now, worker)
  redis.call('HSET', workers, worker .. ':last', now)
  redis.call('HSETNX', workers, worker .. ':first', now)
end

-- no lease on batch 'member' any more, whoever held it
local function end_lease(member)
  forget_request(member)
  redis.call('ZREM', leases, member)
  redis.call('HDEL', leasemap, member)
end

-- ack one lease ('acked': the bitmap of its epoch); returns 'acked', 'late', 'duplicate', 'invalid', 'stale'
-- or 'not-owner'
local function ack(lease, worker, acked)
  local verdict, e, i = verify(lease, worker)
  if verdict ~= 'ok' then return verdict end
  local member = e .. ':' .. i
  if redis.call('SETBIT', acked, i, 1) == 1 then
    end_lease(member)  -- granted again after a roll back: training it again adds nothing
    return 'duplicate'
  end
  local size = batch_size(i)
  local held, by = holder(member)
  local late = held ~= lease or by ~= worker
  end_lease(member)
  local cursor = redis.call('HMGET', job, 'epoch', 'next')
  local epoch, nxt = tonumber(cursor[1]), tonumber(cursor[2])
  if e > epoch or (e == epoch and i >= nxt) then
    redis.call('SADD', ahead, member)  -- granted after the state the keys rolled back to: never again
    if e > epoch and e > (tonumber(redis.call('HGET', job, 'acked_top')) or -1) then
      redis.call('HSET', job, 'acked_top', e)  -- so that deleting the job finds this epoch's bitmap
    end
  end
  redis.call('HINCRBY', ackcount, e, 1)
  redis.call('HINCRBY', job, 'acked', 1)
  redis.call('HINCRBY', job, 'acked_sequences', size)
  if late then redis.call('HINCRBY', job, 'late_acks', 1) end
  redis.call('HINCRBY', workers, worker .. ':acked', 1)
  redis.call('HINCRBY', workers, worker .. ':acked_sequences', size)
  touch(worker)
  return late and 'late' or 'acked'
end

local COUNTERS = {'handed', 'acked', 'acked_sequences', 'redelivered'}

-- fold a worker's counters into the job's 'retired_*' totals and forget it
local function retire(w)
  for _, c in ipairs(COUNTERS) do
    local v = redis.call('HGET', workers, w .. ':' .. c)
    if v then redis.call('HINCRBY', job, 'retired_' .. c, v) end
  end
  -- request numbers are microsecond clocks: the highest one retired is the floor a worker without a record
  -- must pass for its grants to count as in order (a retired worker's late request must not)
  local seq = tonumber(redis.call('HGET', workers, w .. ':seq') or '0')
  if seq > tonumber(redis.call('HGET', job, 'retired_seq') or '0') then redis.call('HSET', job, 'retired_seq', seq) end
  redis.call('HDEL', workers, w .. ':handed', w .. ':acked', w .. ':acked_sequences', w .. ':redelivered',
             w .. ':first', w .. ':last', w .. ':seq')
  redis.call('ZREM', seen, w)
  redis.call('HINCRBY', job, 'retired_workers', 1)
end

-- retire workers idle for idle_ms, and the longest idle beyond max_workers (a few per call: bounded work)
-- (never the worker asking: it may share its millisecond with the longest idle)
local function prune(idle_ms, max_workers, asking)
  for _, w in ipairs(redis.call('ZRANGEBYSCORE', seen, '-inf', now - idle_ms, 'LIMIT', 0, 4)) do retire(w) end
  local extra = math.min(redis.call('ZCARD', seen) - max_workers, 4)
  if extra > 0 then
    for _, w in ipairs(redis.call('ZRANGE', seen, 0, extra)) do
      if extra > 0 and w ~= asking then
        retire(w)
        extra = extra - 1
      end
    end
  end
end
"""

# KEYS[1..8]: as in the prelude, KEYS[9..]: the acked bitmaps of ARGV[6..]
# ARGV[1]: worker, ARGV[2]: request id ('' for none), ARGV[3]: idle ms after
# which a worker's counters fold into the totals, ARGV[4]: most workers tracked, ARGV[5]: the request's
# sequence number in its worker's stream (increasing; 0 for none), ARGV[6..]: lease ids to ack first (the
# batches the worker finished)
# returns {state, ...}:
#   {'lease', epoch, index, lease id, expiry ms, redelivered 0|1, job instance id, in order 0|1, acks...}
#   {'wait', retry after ms, job instance id, acks...}   (all handed out; leases or the epoch boundary pending)
#   {'done'|'cancelled', 0, job instance id, acks...}, {'missing'}
# A request id makes the call idempotent per worker: asked again with the same id while the lease it
# granted is still this worker's, the same lease is returned instead of a second one.
# 'in order': no request of this worker with a higher sequence number was granted a batch before this one,
# so every later-numbered request gets a later batch (or a redelivered one): the client may yield this batch
# once its earlier-numbered requests are answered, without waiting for the later ones.
# (the instance id is new for every created job, so callers can cache a job's config safely)
NEXT = _PRELUDE + """
if redis.call('EXISTS', job) == 0 then return {'missing'} end
local worker, rid = ARGV[1], ARGV[2]
local acks = {}
for a = 6, #ARGV do acks[#acks + 1] = ack(ARGV[a], worker, KEYS[a + 3]) end
if #acks > 0 then redis.call('HSET', job, 'acked_at', now) end  -- a write, so a durability wait covers earlier acks
finish_if_done()
local status = redis.call('HGET', job, 'status')
local instance = redis.call('HGET', job, 'instance')
if status ~= 'active' then return {status, 0, instance, unpack(acks)} end
touch(worker)
prune(tonumber(ARGV[3]), tonumber(ARGV[4]), worker)

if rid ~= '' then
  local prev = redis.call('HGET', requests, worker .. '|' .. rid)
  if prev then
    local member, redelivered, inorder = string.match(prev, '^([^|]*)|(%d)|(%d)|%d$')
    local lease, by, by_rid = holder(member)
    local expiry = redis.call('ZSCORE', leases, member)
    if by == worker and by_rid == rid and expiry and tonumber(expiry) > now then
      -- answered again: from now on this grant may have reached the worker, so it is never taken back
      redis.call('HSET', requests, worker .. '|' .. rid, member .. '|' .. redelivered .. '|' .. inorder .. '|1')
      local e, i = string.match(member, '^(%d+):(%d+)$')
      return {'lease', tonumber(e), tonumber(i), lease, tonumber(expiry), tonumber(redelivered), instance,
              tonumber(inorder), unpack(acks)}
    end
  end
end

local lease_ms = tonumber(redis.call('HGET', job, 'lease_ms'))

local function grant(e, i, redelivered)
  local seq, inorder = tonumber(ARGV[5]), 0
  if seq > 0 then
    local last = redis.call('HGET', workers, worker .. ':seq') or redis.call('HGET', job, 'retired_seq') or '0'
    if seq > tonumber(last) then
      inorder = 1
      redis.call('HSET', workers, worker .. ':seq', seq)
    end
  end
  local attempt = redis.call('HINCRBY', job, 'attempts', 1)
  local lease = lease_id(e, i, attempt, instance, worker)
  local member = e .. ':' .. i
  forget_request(member)  -- an expired lease's holder may ask again with its old request id: not for this one
  redis.call('ZADD', leases, now + lease_ms, member)
  redis.call('HSET', leasemap, member, lease .. '|' .. worker .. '|' .. rid)
  if rid ~= '' then
    redis.call('HSET', requests, worker .. '|' .. rid, member .. '|' .. redelivered .. '|' .. inorder .. '|0')
  end
  redis.call('HINCRBY', job, 'handed', 1)
  redis.call('HINCRBY', workers, worker .. ':handed', 1)
  if redelivered == 1 then
    redis.call('HINCRBY', job, 'redelivered', 1)
    redis.call('HINCRBY', workers, worker .. ':redelivered', 1)
  end
  return {'lease', e, i, lease, now + lease_ms, redelivered, instance, inorder, unpack(acks)}
end

local expired = redis.call('ZRANGEBYSCORE', leases, '-inf', now, 'LIMIT', 0, 1)
if #expired > 0 then
  local e, i = string.match(expired[1], '^(%d+):(%d+)$')
  -- a batch whose grant was taken back (its request failed) was never handed out: not a redelivery
  local redelivered = redis.call('HGET', leasemap, expired[1]) == '-0' and 0 or 1
  return grant(tonumber(e), tonumber(i), redelivered)
end
-- the cursor's next batch, past those acked ahead of it (each skip consumes an 'ahead' entry, so the loop is
-- bounded by that set); nil when the epoch boundary holds it back or the last epoch is all handed out
local function from_cursor()
  local f = redis.call('HMGET', job, 'epoch', 'next', 'bpe', 'epochs', 'boundary')
  local epoch, nxt, bpe, epochs = tonumber(f[1]), tonumber(f[2]), tonumber(f[3]), tonumber(f[4])
  local moved = false
  while true do
    if nxt >= bpe then
      local gated = f[5] == 'ack' and tonumber(redis.call('HGET', ackcount, epoch) or '0') < bpe
      if gated or (epochs >= 0 and epoch + 1 >= epochs) then
        if moved then redis.call('HSET', job, 'epoch', epoch, 'next', nxt) end  -- past what it skipped
        return nil
      end
      epoch, nxt, moved = epoch + 1, 0, true
    end
    if redis.call('SREM', ahead, epoch .. ':' .. nxt) == 0 then
      redis.call('HSET', job, 'epoch', epoch, 'next', nxt + 1)
      return epoch, nxt
    end
    nxt, moved = nxt + 1, true
  end
end

local epoch, nxt = from_cursor()
if not epoch then
  local first = redis.call('ZRANGE', leases, 0, 0, 'WITHSCORES')
  local retry = 100
  if #first > 0 then retry = math.max(20, math.min(1000, tonumber(first[2]) - now)) end
  return {'wait', retry, instance, unpack(acks)}
end
return grant(epoch, nxt, 0)
"""

# KEYS[1..8]: as in the prelude, KEYS[9..]: the acked bitmaps of ARGV[2..]; ARGV[1]: worker, ARGV[2..]: lease ids
# returns one verdict per lease ('acked', 'late', 'duplicate', 'invalid', 'stale', 'not-owner'), or {'missing'}
ACK = _PRELUDE + """
if redis.call('EXISTS', job) == 0 then return {'missing'} end
local out = {}
for a = 2, #ARGV do out[#out + 1] = ack(ARGV[a], ARGV[1], KEYS[a + 7]) end
redis.call('HSET', job, 'acked_at', now)  -- a write, so a durability wait covers earlier acks
finish_if_done()
return out
"""

# KEYS[1..8]: as in the prelude; ARGV[1]: worker, ARGV[2..]: lease ids the worker gives back unacked
# returns how many were still leased to that worker under those ids (now due for immediate redelivery),
# -1: no such job
RELEASE = _PRELUDE + """
if redis.call('EXISTS', job) == 0 then return -1 end
local n = 0
for a = 2, #ARGV do
  local e, i = string.match(ARGV[a], '^(%d+):(%d+):')
  if e then
    local member = e .. ':' .. i
    local lease, by = holder(member)
    if lease == ARGV[a] and by == ARGV[1] and redis.call('ZSCORE', leases, member) then
      give_back(member, lease, by)
      n = n + 1
    end
  end
end
return n
"""

# KEYS[1..8]: as in the prelude; ARGV[1]: worker, ARGV[2]: lease id, ARGV[3]: 1 if its grant was a redelivery
# Takes back a grant whose request failed before the batch reached the worker: the batch is due at once,
# and the counters are as if it had never been handed out. Returns 1, or 0 when the lease is not current
# or a retry of the same request was already answered with it (on another replica, say).
UNGRANT = _PRELUDE + """
local worker, lease = ARGV[1], ARGV[2]
local e, i = string.match(lease, '^(%d+):(%d+):')
if not e then return 0 end
local member = e .. ':' .. i
local held, by, rid = holder(member)
if held ~= lease or by ~= worker or not redis.call('ZSCORE', leases, member) then return 0 end
if rid ~= '' and string.sub(redis.call('HGET', requests, worker .. '|' .. rid) or '', -2) == '|1' then
  return 0  -- a retry of the same request was answered with it: it may be in the worker's hands
end
forget_request(member)
redis.call('ZADD', leases, 0, member)
redis.call('HSET', leasemap, member, '-' .. ARGV[3])
redis.call('HINCRBY', job, 'handed', -1)
redis.call('HINCRBY', workers, worker .. ':handed', -1)
if ARGV[3] == '1' then
  redis.call('HINCRBY', job, 'redelivered', -1)
  redis.call('HINCRBY', workers, worker .. ':redelivered', -1)
end
return 1
"""

# KEYS[1..8]: as in the prelude; ARGV[1]: worker
# A worker known to be gone (its host died, its pod was deleted): its live leases are due at once.
# Returns how many leases it held.
EVICT = _PRELUDE + """
if redis.call('EXISTS', job) == 0 then return -1 end
local n = 0
for _, member in ipairs(redis.call('ZRANGEBYSCORE', leases, '(0', '+inf')) do
  local lease, by = holder(member)
  if by == ARGV[1] then
    give_back(member, lease, by)
    n = n + 1
  end
end
return n
"""

# KEYS[1]: job hash
# ARGV[1]: dataset, ARGV[2]: config hash, ARGV[3..]: field/value pairs
# returns {'created'}, {'exists'} (same dataset and config) or {'conflict', the job's dataset, its config JSON}
CREATE_JOB = """
local owner = redis.call('HGET', KEYS[1], 'dataset')
if owner and owner == ARGV[1] and redis.call('HGET', KEYS[1], 'config_hash') == ARGV[2] then return {'exists'} end
if owner then return {'conflict', owner, redis.call('HGET', KEYS[1], 'config') or ''} end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
return {'created'}
"""

# KEYS[1]: job hash; returns 1 when the job was active and is now cancelled, 0 if it was not active, -1: no such job
CANCEL_JOB = NOW_MS + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return -1 end
if status ~= 'active' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', now)
return 1
"""

# KEYS[1]: job hash, KEYS[2..8]: the job's other fixed keys, KEYS[9..]: acked bitmaps of epochs 0..ARGV[2]-1
# ARGV[1]: the dataset uid the job must read ('' for any), ARGV[2]: number of epochs whose bitmaps are passed
# (the later of the cursor's epoch and 'acked_top', plus one)
# returns the number of keys removed, -1 when the job reads another dataset generation (kept), or -2 when it
# has more epochs than passed (nothing removed: read the epoch again)
DELETE_JOB = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[1] ~= '' and redis.call('HGET', KEYS[1], 'dataset_uid') ~= ARGV[1] then return -1 end
local f = redis.call('HMGET', KEYS[1], 'epoch', 'acked_top')
if math.max(tonumber(f[1]), tonumber(f[2]) or -1) + 1 > tonumber(ARGV[2]) then return -2 end
local removed = 0
for i = 1, #KEYS do removed = removed + redis.call('UNLINK', KEYS[i]) end
return removed
"""

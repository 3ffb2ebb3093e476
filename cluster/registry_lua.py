"""The registry's Lua scripts (see `cluster.registry` for the key layout and the semantics they implement).

Every script starts with `PRELUDE` (key naming, live-member listing with lazy pruning, the prefill load
score); `SCRIPTS` maps a script name to its full source, ready for `register_script`.
"""

from __future__ import annotations

# --- Lua: KEYS[1] = the workers set (routes the call to the right node), ARGV[1] = key prefix -----------
PRELUDE = """
local P = ARGV[1]
local function wkey(id) return P .. 'w:' .. id end
local function num(v) return tonumber(v) or 0 end
local function now_ms() local t = redis.call('TIME') return t[1] * 1000 + math.floor(t[2] / 1000) end
local function members(role)
  local ids = {}
  for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
    local r = redis.call('HGET', wkey(id), 'role')
    if not r then redis.call('SREM', KEYS[1], id)
    elseif role == '' or r == role then ids[#ids + 1] = id end
  end
  table.sort(ids)
  return ids
end
local function score(id)
  local f = redis.call('HMGET', wkey(id), 'num_waiting', 'num_running')
  return math.max(num(f[1]) + num(f[2]), num(redis.call('GET', wkey(id) .. ':inflight')))
end
local function least_loaded(ids)
  local best, bs = false, nil
  for _, id in ipairs(ids) do
    local s = score(id)
    if bs == nil or s < bs then best, bs = id, s end
  end
  return best
end
"""
LUA = {
    # ARGV: P, id, ttl_ms, is_register ('1'/'0'), field, value, ...; heartbeat: 0 if the worker expired
    "upsert": """
local k = wkey(ARGV[2])
if ARGV[4] == '1' then redis.call('DEL', k, k .. ':outstanding', k .. ':inflight')
elseif redis.call('EXISTS', k) == 0 then return 0 end
redis.call('HSET', k, unpack(ARGV, 5))
redis.call('PEXPIRE', k, ARGV[3])
redis.call('SADD', KEYS[1], ARGV[2])
return 1""",
    # ARGV: P, id
    "deregister": """
local k = wkey(ARGV[2])
redis.call('SREM', KEYS[1], ARGV[2])
return redis.call('DEL', k, k .. ':outstanding', k .. ':inflight') > 0 and 1 or 0""",
    # ARGV: P, role ('' = any)
    "list": """
local out = {}
for _, id in ipairs(members(ARGV[2])) do out[#out + 1] = redis.call('HGETALL', wkey(id)) end
return out""",
    # ARGV: P, num_blocks, worker_id ('' = any), role, counter_ttl_ms
    "reserve": """
local n = tonumber(ARGV[2])
local ids = ARGV[3] ~= '' and {ARGV[3]} or members(ARGV[4])
local best, room_best = false, -1
for _, id in ipairs(ids) do
  local free = redis.call('HGET', wkey(id), 'free_kv_blocks')
  if free then
    local room = tonumber(free) - num(redis.call('GET', wkey(id) .. ':outstanding'))
    if room >= n and room > room_best then best, room_best = id, room end
  end
end
if best then
  redis.call('INCRBY', wkey(best) .. ':outstanding', n)
  redis.call('PEXPIRE', wkey(best) .. ':outstanding', ARGV[5])
end
return best""",
    # ARGV: P, id, num_blocks, committed ('1'/'0')
    "release": """
local k, n = wkey(ARGV[2]), tonumber(ARGV[3])
local left = math.max(num(redis.call('GET', k .. ':outstanding')) - n, 0)
if left == 0 then redis.call('DEL', k .. ':outstanding')
else redis.call('SET', k .. ':outstanding', left, 'KEEPTTL') end
if ARGV[4] == '1' and redis.call('EXISTS', k) == 1 then
  redis.call('HSET', k, 'free_kv_blocks', math.max(num(redis.call('HGET', k, 'free_kv_blocks')) - n, 0))
  redis.call('HINCRBY', k, 'reserved_kv_blocks', n)
end
return left""",
    # ARGV: P, id, counter name, delta (0 = read), ttl_ms
    "counter": """
local c = wkey(ARGV[2]) .. ':' .. ARGV[3]
local d = tonumber(ARGV[4])
if d == 0 then return num(redis.call('GET', c)) end
local v = math.max(num(redis.call('GET', c)) + d, 0)
if v == 0 then redis.call('DEL', c) else redis.call('SET', c, v, 'PX', ARGV[5]) end
return v""",
    # ARGV: P, role
    "pick_prefill": "return least_loaded(members(ARGV[2]))",
    # ARGV: P, id, ttl_ms, hash, ...
    "record_prefixes": """
local now, ttl = now_ms(), tonumber(ARGV[3])
for i = 4, #ARGV do
  local k = P .. 'px:' .. ARGV[i]
  redis.call('ZREMRANGEBYSCORE', k, '-inf', now)
  redis.call('ZADD', k, now + ttl, ARGV[2])
  if redis.call('PTTL', k) < ttl then redis.call('PEXPIRE', k, ttl) end
end
return #ARGV - 3""",
    # ARGV: P, role ('' = any), hash, ...
    "best_prefix": """
local now, cand, ids, len, ok = now_ms(), nil, {}, 0, {}
for i = 3, #ARGV do
  local nxt, nids = {}, {}
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. 'px:' .. ARGV[i], '(' .. now, '+inf')) do
    if cand == nil or cand[id] then
      if ok[id] == nil then
        local r = redis.call('HGET', wkey(id), 'role')
        ok[id] = (r and (ARGV[2] == '' or r == ARGV[2])) and true or false
      end
      if ok[id] then nxt[id] = true; nids[#nids + 1] = id end
    end
  end
  if #nids == 0 then break end
  cand, ids, len = nxt, nids, i - 2
end
if len == 0 then return {'', 0} end
table.sort(ids)
return {least_loaded(ids), len}""",
}
SCRIPTS = {name: PRELUDE + body for name, body in LUA.items()}

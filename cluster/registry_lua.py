"""The registry's Lua scripts (see `cluster.registry` for the key layout and the semantics they implement).

Every script starts with `PRELUDE` (key naming, live-member listing with lazy pruning, the prompt load
score, the decode pick, counters, the prefix lookup); `SCRIPTS` maps a script name to its full source,
ready for `register_script`.
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
local function scores_of(ids)
  local s = {}
  for _, id in ipairs(ids) do s[id] = score(id) end
  return s
end
local function by_score(ids, s)
  local out = {unpack(ids)}
  table.sort(out, function(a, b) if s[a] ~= s[b] then return s[a] < s[b] end return a < b end)
  return out
end
local function most_room(ids, n, skip)
  local best, room_best = false, -1
  for _, id in ipairs(ids) do
    local free = not skip[id] and redis.call('HGET', wkey(id), 'free_kv_blocks')
    if free then
      local room = tonumber(free) - num(redis.call('GET', wkey(id) .. ':outstanding'))
      if room >= n and room > room_best then best, room_best = id, room end
    end
  end
  return best
end
local function take_blocks(id, n, ttl)
  redis.call('INCRBY', wkey(id) .. ':outstanding', n)
  redis.call('PEXPIRE', wkey(id) .. ':outstanding', ttl)
end
local function release_blocks(id, n, committed)
  local k = wkey(id)
  local left = math.max(num(redis.call('GET', k .. ':outstanding')) - n, 0)
  if left == 0 then redis.call('DEL', k .. ':outstanding')
  else redis.call('SET', k .. ':outstanding', left, 'KEEPTTL') end
  if committed and redis.call('EXISTS', k) == 1 then
    redis.call('HSET', k, 'free_kv_blocks', math.max(num(redis.call('HGET', k, 'free_kv_blocks')) - n, 0))
    redis.call('HINCRBY', k, 'reserved_kv_blocks', n)
  end
  return left
end
local function bump(id, name, d, ttl)
  local c = wkey(id) .. ':' .. name
  if d == 0 then return num(redis.call('GET', c)) end
  local v = math.max(num(redis.call('GET', c)) + d, 0)
  if v == 0 then redis.call('DEL', c) else redis.call('SET', c, v, 'PX', ttl) end
  return v
end
local function record(id, first, ttl)
  local now = now_ms()
  for i = first, #ARGV do
    local k = P .. 'px:' .. ARGV[i]
    redis.call('ZREMRANGEBYSCORE', k, '-inf', now)
    redis.call('ZADD', k, now + ttl, id)
    if redis.call('PTTL', k) < ttl then redis.call('PEXPIRE', k, ttl) end
  end
end
-- the worker among `s` (id -> load score) holding the longest leading run of the hashes ARGV[first..]
-- (ties: lower score, then smaller id), and the run's length; false, 0 if none holds the first
local function longest_prefix(first, s)
  local now, cand, ids, len = now_ms(), nil, {}, 0
  for i = first, #ARGV do
    local nxt, nids = {}, {}
    for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. 'px:' .. ARGV[i], '(' .. now, '+inf')) do
      if s[id] and (cand == nil or cand[id]) then nxt[id] = true; nids[#nids + 1] = id end
    end
    if #nids == 0 then break end
    cand, ids, len = nxt, nids, i - first + 1
  end
  if len == 0 then return false, 0 end
  return by_score(ids, s)[1], len
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
    # ARGV: P, decode blocks (-1: no decode reservation), decode role, counter_ttl_ms, prompt role, rule,
    # max prompt workers returned, load slack, prefix_ttl_ms, hash, ...
    # -> {missing ('' | 'decode' | prompt role: nothing taken), decode id or '', matched blocks, prompt ids...}
    "place": """
local n, role, rule, ttl = tonumber(ARGV[2]), ARGV[5], ARGV[6], ARGV[4]
local ids = members(role)
if #ids == 0 then return {role, '', 0} end
local decode = ''
if n >= 0 then
  decode = most_room(members(ARGV[3]), n, {})
  if not decode then return {'decode', '', 0} end
end
local s, order, matched = scores_of(ids), {}, 0
if rule == 'round_robin' then
  local c = redis.call('INCR', P .. 'rr:' .. role)
  redis.call('PEXPIRE', P .. 'rr:' .. role, ttl)
  for i = 0, #ids - 1 do order[#order + 1] = ids[(c - 1 + i) % #ids + 1] end
else
  order = by_score(ids, s)
  if rule == 'prefix_aware' and #ARGV >= 10 then
    local best, len = longest_prefix(10, s)
    if best and s[best] <= s[order[1]] + tonumber(ARGV[8]) then
      local rest = {best}
      for _, id in ipairs(order) do if id ~= best then rest[#rest + 1] = id end end
      order, matched = rest, len
    end
  end
end
if decode ~= '' then take_blocks(decode, n, ttl) end
bump(order[1], 'inflight', 1, ttl)
if rule == 'prefix_aware' then record(order[1], 10, tonumber(ARGV[9])) end
local out = {'', decode, matched}
for i = 1, math.min(tonumber(ARGV[7]), #order) do out[#out + 1] = order[i] end
return out""",
    # ARGV: P, decode id ('' = none), decode blocks, committed ('1'/'0'), inflight id ('' = none), ttl_ms
    "release": """
if ARGV[2] ~= '' then release_blocks(ARGV[2], tonumber(ARGV[3]), ARGV[4] == '1') end
if ARGV[5] ~= '' then bump(ARGV[5], 'inflight', -1, ARGV[6]) end
return 1""",
    # ARGV: P, num_blocks, worker_id ('' = any), role, counter_ttl_ms, excluded id, ...
    "reserve": """
local n, skip = tonumber(ARGV[2]), {}
for i = 6, #ARGV do skip[ARGV[i]] = true end
local best = most_room(ARGV[3] ~= '' and {ARGV[3]} or members(ARGV[4]), n, skip)
if best then take_blocks(best, n, ARGV[5]) end
return best""",
    # ARGV: P, id, num_blocks, committed ('1'/'0')
    "release_decode": "return release_blocks(ARGV[2], tonumber(ARGV[3]), ARGV[4] == '1')",
    # ARGV: P, id, counter name, delta (0 = read), ttl_ms
    "counter": "return bump(ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5])",
    # ARGV: P, id, ttl_ms, hash, ...
    "record_prefixes": "record(ARGV[2], 4, tonumber(ARGV[3])) return #ARGV - 3",
    # ARGV: P, role ('' = any), hash, ...
    "best_prefix": """
local best, len = longest_prefix(3, scores_of(members(ARGV[2])))
return {best or '', len}""",
}
SCRIPTS = {name: PRELUDE + body for name, body in LUA.items()}

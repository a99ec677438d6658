-- Presence of one room (see presence.rs). Every key is in the room's hash slot.
-- KEYS[1]  hash  identity -> sockets of it in the room, on every node (the members)
-- KEYS[2]  zset  node id -> when its entries expire (ms, Redis's clock)
-- KEYS[3]  hash  identity -> sockets of it in the room on this node
-- KEYS[4]  string  the room's last join or leave number (see next_seq); only given when
--                   the node notifies them
-- ARGV[1]  mode: 'set', 'touch', 'sync' or 'read'
-- ARGV[2]  this node's id
-- ARGV[3]  how long this node's entries live after this call (ms)
-- ARGV[4]  how to publish join and leave events: 'PUBLISH', 'SPUBLISH' (a cluster), or '0'
-- ARGV[5]  the room's channel
-- ARGV[6]  a join frame up to its connectionID's value; ARGV[7] the same for leave
-- ARGV[8]  the prefix of every node's hash key (KEYS[3] is ARGV[8] .. ARGV[2])
-- set:   ARGV[9] identity, ARGV[10] its sockets on this node now
-- touch: ARGV[9] how many identities this node has in the room
-- sync:  ARGV[9..] identity, sockets pairs: everything this node has in the room
-- read:  ARGV[9] the most members to list
-- Identities are JSON string literals, so that frames and replies embed them as they are.
-- Replies: set, touch and sync {1 (or 0: this node had been swept out or its share
-- differs), told...}; read {count, listed, told}. `told` is every join ('j' .. identity)
-- and leave ('l' .. identity) the call made, in order, each as 'j' or 'l', its number,
-- ':' and the identity: the caller's to notify.
local members, nodes, mine, seq = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local mode, node, lifetime = ARGV[1], ARGV[2], tonumber(ARGV[3])
local events, channel = ARGV[4] ~= '0', ARGV[5]
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)

local told = {}

-- The room's next join or leave number ('0' when the caller does not number them): one
-- more than the last, and at least Redis's clock (ms x 1000), so that the numbers keep
-- growing when Redis forgot the last ones or lost its latest writes (written with
-- string.format: Lua's own conversion of a number this large would round it).
local function next_seq()
  if not seq then return '0' end
  local n = math.max(tonumber(redis.call('GET', seq) or '0') + 1, now * 1000)
  local text = string.format('%d', n)
  redis.call('SET', seq, text, 'PX', 2 * lifetime)
  return text
end

local function adjust(identity, delta)
  if delta == 0 then return end
  local total = redis.call('HINCRBY', members, identity, delta)
  if total <= 0 then
    redis.call('HDEL', members, identity)
    if total - delta > 0 then
      table.insert(told, 'l' .. next_seq() .. ':' .. identity)
      if events then redis.call(ARGV[4], channel, ARGV[7] .. identity .. '}') end
    end
  elseif total - delta <= 0 then
    table.insert(told, 'j' .. next_seq() .. ':' .. identity)
    if events then redis.call(ARGV[4], channel, ARGV[6] .. identity .. '}') end
  end
end

local function reply(status)
  local answer = {status}
  for _, event in ipairs(told) do table.insert(answer, event) end
  return answer
end

-- Takes out the entries of every node that stopped refreshing them; says whether this
-- node was one (it then sends everything again).
local function sweep()
  local swept_mine = false
  for _, gone in ipairs(redis.call('ZRANGEBYSCORE', nodes, '-inf', now)) do
    local key = ARGV[8] .. gone
    local held = redis.call('HGETALL', key)
    for i = 1, #held, 2 do adjust(held[i], -tonumber(held[i + 1])) end
    redis.call('DEL', key)
    redis.call('ZREM', nodes, gone)
    if gone == node then swept_mine = true end
  end
  return swept_mine
end

-- This node's entries live `lifetime` from now; the room's keys outlive the last node.
local function touch()
  if redis.call('EXISTS', mine) == 1 then
    redis.call('ZADD', nodes, now + lifetime, node)
    redis.call('PEXPIRE', mine, 2 * lifetime)
  else
    redis.call('ZREM', nodes, node)
  end
  redis.call('PEXPIRE', nodes, 2 * lifetime)
  redis.call('PEXPIRE', members, 2 * lifetime)
  if seq then redis.call('PEXPIRE', seq, 2 * lifetime) end
end

if mode == 'read' then
  sweep()
  local count = redis.call('HLEN', members)
  local max = tonumber(ARGV[9])
  if count <= max then return {count, redis.call('HKEYS', members), told} end
  return {count, redis.call('HRANDFIELD', members, max), told}
end

local swept_mine = sweep()
if mode == 'set' then
  local identity, sockets = ARGV[9], tonumber(ARGV[10])
  local before = tonumber(redis.call('HGET', mine, identity) or '0')
  if sockets > 0 then
    redis.call('HSET', mine, identity, sockets)
  else
    redis.call('HDEL', mine, identity)
  end
  adjust(identity, sockets - before)
elseif mode == 'touch' then
  if swept_mine or redis.call('HLEN', mine) ~= tonumber(ARGV[9]) then return reply(0) end
elseif mode == 'sync' then
  local before = {}
  local held = redis.call('HGETALL', mine)
  for i = 1, #held, 2 do before[held[i]] = tonumber(held[i + 1]) end
  redis.call('DEL', mine)
  for i = 9, #ARGV, 2 do
    local identity, sockets = ARGV[i], tonumber(ARGV[i + 1])
    redis.call('HSET', mine, identity, sockets)
    adjust(identity, sockets - (before[identity] or 0))
    before[identity] = nil
  end
  for identity, sockets in pairs(before) do adjust(identity, -sockets) end
  swept_mine = false
end
touch()
if swept_mine then return reply(0) end
return reply(1)

-- Release a hold (the caller's choice) or expire it (the sweeper, once its
-- time has come): the held amount becomes available again. A hold ends once:
-- held -> released | expired | captured (capture.lua), never back.
--
-- KEYS[1] hold hash   KEYS[2] wallet hash   KEYS[3] the partition's hold expiry set
-- KEYS[4] the partition's hold event stream      (all as in hold.lua)
-- ARGV[1] hold id   ARGV[2] wallet id   ARGV[3] 'released' or 'expired'
-- A release asked for at or after the expiry time expires the hold instead:
-- it had ended by then.
--
-- Returns one of:
--   {'ok', status, event id}   ended now, as status
--   {'ended', status}          it had ended before (released, expired or captured)
--   {'not_due'}                an expiry asked for before the hold's time
--   {'not_found'}              no such hold (of this wallet)

if ARGV[3] ~= 'released' and ARGV[3] ~= 'expired' then
    return redis.error_reply('end_hold: bad status')
end
local hold = redis.call('HMGET', KEYS[1], 'w', 'a', 'st', 'x', 'd', 'c', 'i')
if not hold[1] or hold[1] ~= ARGV[2] then
    return {'not_found'}
end
if hold[3] ~= 'held' then
    return {'ended', hold[3]}
end
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local status = ARGV[3]
if now_ms >= tonumber(hold[4]) then
    status = 'expired'
elseif status == 'expired' then
    return {'not_due'}
end
-- A wallet loaded again from the ledger may hold less than this hold (its
-- holds were lost with it): never below zero, in amount (h) or number (n).
local wallet = redis.call('HMGET', KEYS[2], 'h', 'n')
local held = tonumber(wallet[1] or '0')
if held > 0 then
    redis.call('HINCRBY', KEYS[2], 'h', string.format('%.0f', -math.min(held, tonumber(hold[2]))))
end
if tonumber(wallet[2] or '0') > 0 then
    redis.call('HINCRBY', KEYS[2], 'n', -1)
end
local ended_ms = string.format('%.0f', now_ms)
redis.call('HSET', KEYS[1], 'st', status, 't', ended_ms)
if hold[7] then
    redis.call('EXPIRE', KEYS[1], hold[7])  -- ended: kept for replays, then let go
end
redis.call('ZREM', KEYS[3], ARGV[1] .. ':' .. ARGV[2])
return {'ok', status, redis.call('XADD', KEYS[4], '*', 'd', hold[5], 'k', status, 'x', hold[4], 't', ended_ms, 'c', hold[6])}

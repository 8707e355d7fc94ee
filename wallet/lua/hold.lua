-- Reserve part of a wallet's available balance for a call whose cost is not
-- known yet (a streamed completion), once per idempotency key.
--
-- KEYS[1] wallet hash (apply.lua): h holds the sum of its active holds, n their number
-- KEYS[2] idempotency record of the hold {h = request hash, id = hold id}
-- KEYS[3] hold hash {w = wallet id, a = amount, st = held | captured | released | expired,
--                    x = expires at (ms, Redis clock), c = currency, d = payload (JSON),
--                    i = how long it is kept once ended (s),
--                    after it ends: t = ended at (ms), and for a capture r = requested,
--                    k = captured, n = the capture's entry id ('' when nothing was captured)}
--         It never expires while held: the wallet's h counts it until end_hold.lua or
--         capture.lua ends it (however late the sweeper comes), and only then is it given
--         its time to live (i).
-- KEYS[4] the partition's hold expiry set (member 'hold id:wallet id', score = expires at ms)
-- KEYS[5] the partition's hold event stream (what wallet/holds.py records in Postgres)
-- ARGV[1] hold id   ARGV[2] amount_micros   ARGV[3] request hash   ARGV[4] payload (JSON)
-- ARGV[5] expires_in_s   ARGV[6] idempotency ttl_s (after the hold ends)   ARGV[7] wallet id
-- ARGV[8] largest amount (2^53 - 1)   ARGV[9] most active holds a wallet may have
--
-- Returns one of:
--   {'ok', hold id, expires at ms, event id}    held
--   {'replay', hold id}                          the key's earlier hold
--   {'conflict'}                                 the key was used with another request
--   {'missing'}                                  the wallet is not in Redis: load it, retry
--   {'frozen', balance} | {'insufficient', balance, held}
--   {'too_many', active holds}                  the wallet has ARGV[9] active holds already

local record = redis.call('HMGET', KEYS[2], 'h', 'id')
if record[1] then
    if record[1] ~= ARGV[3] then
        return {'conflict'}
    end
    return {'replay', record[2]}
end

-- Plain decimal integers only: HINCRBY, EXPIRE and the recorder read them as such.
local amount = string.match(ARGV[2], '^[1-9]%d*$') and tonumber(ARGV[2])
local expires_in_s = string.match(ARGV[5], '^[1-9]%d*$') and tonumber(ARGV[5])
if not amount or amount > tonumber(ARGV[8]) or not expires_in_s
    or not string.match(ARGV[6], '^[1-9]%d*$') or not string.match(ARGV[9], '^[1-9]%d*$') then
    return redis.error_reply('hold: bad amount, expiry, ttl or bound')
end
if redis.call('EXISTS', KEYS[3]) == 1 then
    return redis.error_reply('hold: the hold id is taken')  -- never overwrite another hold
end
local wallet = redis.call('HMGET', KEYS[1], 'b', 'o', 's', 'c', 'e', 'h', 'n')
if not (wallet[1] and wallet[2] and wallet[3] and wallet[4] and wallet[5]) then
    return {'missing'}
end
if wallet[3] ~= 'active' then
    return {'frozen', wallet[1]}
end
-- Counted here, in the same step that adds one: however many run at once,
-- a wallet never has more (an attacker's holds cost Redis memory).
local active = tonumber(wallet[7] or '0')
if active >= tonumber(ARGV[9]) then
    return {'too_many', string.format('%.0f', active)}
end
local held = tonumber(wallet[6] or '0')
if tonumber(wallet[1]) - held - amount < -tonumber(wallet[2]) then
    return {'insufficient', wallet[1], string.format('%.0f', held)}
end

local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local expires_ms = string.format('%.0f', now_ms + expires_in_s * 1000)
local keep_s = expires_in_s + tonumber(ARGV[6])
redis.call('HINCRBY', KEYS[1], 'h', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'n', 1)
redis.call('HSET', KEYS[3], 'w', ARGV[7], 'a', ARGV[2], 'st', 'held', 'x', expires_ms, 'c', wallet[4], 'd', ARGV[4],
    'i', ARGV[6])
redis.call('ZADD', KEYS[4], expires_ms, ARGV[1] .. ':' .. ARGV[7])
local event_id = redis.call('XADD', KEYS[5], '*', 'd', ARGV[4], 'k', 'held', 'x', expires_ms,
    't', string.format('%.0f', now_ms), 'c', wallet[4])
redis.call('HSET', KEYS[2], 'h', ARGV[3], 'id', ARGV[1])
redis.call('EXPIRE', KEYS[2], keep_s)
return {'ok', ARGV[1], expires_ms, event_id}

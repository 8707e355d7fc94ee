-- Capture a hold: debit the call's actual cost and release the hold, in one
-- atomic step. The cost may exceed the hold: it is taken as far as the
-- wallet's overdraft limit allows (other holds still count), and the rest is
-- the shortfall. A frozen wallet pays at most what was held. The debit is an
-- ordinary charge from here on (outbox, write-through, sweeper), keyed
-- 'hold:<hold id>' in the wallet, so the ledger holds one capture per hold.
--
-- KEYS[1] hold hash   KEYS[2] wallet hash   KEYS[3] the capture's idempotency record
-- KEYS[4] outbox stream   KEYS[5] abandoned hash   (all as in apply.lua)
-- KEYS[6] the partition's hold expiry set   KEYS[7] its hold event stream (as in hold.lua)
-- ARGV[1] hold id   ARGV[2] wallet id   ARGV[3] requested amount_micros
-- ARGV[4] request hash   ARGV[5] entry id
-- ARGV[6] the entry's payload (JSON) without its head: the payload is
--         '{"amount_micros":' .. captured .. ARGV[6] (keys sorted, amount first)
-- ARGV[7] idempotency ttl_s   ARGV[8] largest amount (2^53 - 1)
--
-- Returns one of:
--   {'ok', captured, balance_after, outbox_id, currency, epoch, event id, ended at ms}
--        captured now; outbox_id '' when nothing could be captured (no entry)
--   {'replay', captured, requested, entry id, state, payload, balance_after, currency}
--        captured before with this amount; state: ok | in_progress | reversed
--        (its entry), none (nothing was captured), gone (its record expired)
--   {'conflict'}          captured before with another amount
--   {'ended', status}     released or expired: nothing to capture
--   {'not_found'}         no such hold (of this wallet)
--   {'missing'}           the wallet is not in Redis: load it, retry

-- A plain decimal integer only: it is stored (r) and recorded as such.
local requested = string.match(ARGV[3], '^[1-9]%d*$') and tonumber(ARGV[3])
if not requested or requested > tonumber(ARGV[8]) then
    return redis.error_reply('capture: bad amount')
end
local hold = redis.call('HMGET', KEYS[1], 'w', 'a', 'st', 'x', 'd', 'r', 'k', 'n', 'c', 'i')
if not hold[1] or hold[1] ~= ARGV[2] then
    return {'not_found'}
end
if hold[3] == 'captured' then
    if hold[6] ~= ARGV[3] then
        return {'conflict'}
    end
    local state, payload, after, currency = 'none', '', '', hold[9]
    if hold[8] ~= '' then
        local record = redis.call('HMGET', KEYS[3], 'id', 'e', 'b', 'x', 'st')
        if record[1] ~= hold[8] then
            state = 'gone'
        else
            payload, after = record[2], record[3]
            if record[5] == 'reversed' then
                state = 'reversed'
            elseif (record[4] ~= '' and #redis.call('XRANGE', KEYS[4], record[4], record[4]) > 0)
                or redis.call('HEXISTS', KEYS[5], record[1]) == 1 then
                state = 'in_progress'
            else
                state = 'ok'
            end
        end
    end
    return {'replay', hold[7], hold[6], hold[8], state, payload, after, currency}
end
if hold[3] ~= 'held' then
    return {'ended', hold[3]}
end

local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local ended_ms = string.format('%.0f', now_ms)
local wallet = redis.call('HMGET', KEYS[2], 'b', 'o', 's', 'c', 'e', 'h', 'n')
if now_ms >= tonumber(hold[4]) then
    -- Past its time: the hold has expired, whether or not the sweeper came by.
    if wallet[6] and tonumber(wallet[6]) > 0 then
        redis.call('HINCRBY', KEYS[2], 'h', string.format('%.0f', -math.min(tonumber(wallet[6]), tonumber(hold[2]))))
    end
    if wallet[7] and tonumber(wallet[7]) > 0 then
        redis.call('HINCRBY', KEYS[2], 'n', -1)
    end
    redis.call('HSET', KEYS[1], 'st', 'expired', 't', ended_ms)
    if hold[10] then
        redis.call('EXPIRE', KEYS[1], hold[10])  -- ended: kept for replays, then let go
    end
    redis.call('ZREM', KEYS[6], ARGV[1] .. ':' .. ARGV[2])
    redis.call('XADD', KEYS[7], '*', 'd', hold[5], 'k', 'expired', 'x', hold[4], 't', ended_ms, 'c', hold[9])
    return {'ended', 'expired'}
end
if not (wallet[1] and wallet[2] and wallet[3] and wallet[4] and wallet[5]) then
    return {'missing'}
end

-- What the wallet can pay without passing its limit, this hold released.
local amount = tonumber(hold[2])
local held = tonumber(wallet[6] or '0')
local released = math.min(held, amount)
local room = tonumber(wallet[1]) - (held - released) + tonumber(wallet[2])
if wallet[3] ~= 'active' then
    room = math.min(room, amount)
end
local captured = math.max(math.min(requested, room), 0)
local captured_text = string.format('%.0f', captured)

if released > 0 then
    redis.call('HINCRBY', KEYS[2], 'h', string.format('%.0f', -released))
end
if tonumber(wallet[7] or '0') > 0 then
    redis.call('HINCRBY', KEYS[2], 'n', -1)  -- one active hold fewer (never below zero, as h)
end
local after_text, outbox_id, entry_id = '', '', ''
if captured > 0 then
    after_text = string.format('%.0f', redis.call('HINCRBY', KEYS[2], 'b', '-' .. captured_text))
    local payload = '{"amount_micros":' .. captured_text .. ARGV[6]
    outbox_id = redis.call('XADD', KEYS[4], '*', 'e', payload, 'b', after_text, 'c', wallet[4], 'w', wallet[5])
    redis.call('HSET', KEYS[3], 'h', ARGV[4], 'id', ARGV[5], 'e', payload, 'b', after_text, 'x', outbox_id,
        'st', 'ok', 'c', wallet[4])
    redis.call('EXPIRE', KEYS[3], math.max(redis.call('TTL', KEYS[1]), tonumber(ARGV[7])))
    entry_id = ARGV[5]
end
redis.call('HSET', KEYS[1], 'st', 'captured', 't', ended_ms, 'r', ARGV[3], 'k', captured_text, 'n', entry_id)
redis.call('EXPIRE', KEYS[1], math.max(redis.call('TTL', KEYS[1]), tonumber(ARGV[7])))
redis.call('ZREM', KEYS[6], ARGV[1] .. ':' .. ARGV[2])
local event_id = redis.call('XADD', KEYS[7], '*', 'd', hold[5], 'k', 'captured', 'x', hold[4], 't', ended_ms,
    'c', wallet[4], 'r', ARGV[3], 'a', captured_text, 'n', entry_id)
return {'ok', captured_text, after_text, outbox_id, wallet[4], wallet[5], event_id, ended_ms}

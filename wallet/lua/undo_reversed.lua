-- Undo in Redis a charge whose entry the ledger has reversed, wherever the
-- charge stands: still pending in the outbox, handed to the sweeper, or
-- already settled as committed by the writer. Used when a request answered
-- 503 and recorded it in the ledger because Redis could not take the abandon.
--
-- KEYS[1] wallet hash   KEYS[2] idempotency record   KEYS[3] outbox stream   KEYS[4] abandoned hash
-- ARGV[1] outbox id     ARGV[2] entry id   ARGV[3] field to undo (b or p)
-- ARGV[4] delta (signed integer string)    ARGV[5] the wallet's epoch when charged
-- ARGV[6] credit amount, '0' for a debit: a settled credit has moved from p to b
-- Returns 1 if this call undid the charge, 0 if it was undone before.

local record = redis.call('HMGET', KEYS[2], 'id', 'st')
local field, delta = ARGV[3], ARGV[4]
if redis.call('XDEL', KEYS[3], ARGV[1]) == 1 or redis.call('HDEL', KEYS[4], ARGV[2]) == 1 then
    -- still pending (or with the sweeper, which now finds nothing to undo)
elseif record[1] == ARGV[2] and record[2] == 'ok' then
    -- settled as committed: a credit left p for b when it settled
    if ARGV[6] ~= '0' then
        field, delta = 'b', '-' .. ARGV[6]
    end
else
    return 0
end
if redis.call('HGET', KEYS[1], 'e') == ARGV[5] then
    redis.call('HINCRBY', KEYS[1], field, delta)
end
if record[1] == ARGV[2] then
    redis.call('HSET', KEYS[2], 'st', 'reversed')
end
return 1

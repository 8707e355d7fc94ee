-- Apply Postgres-first wallet changes (top-ups, refunds, disputes) to Redis,
-- each exactly once, in order.
--
-- KEYS[1] wallet hash: b = balance, s = status, q = the last change applied
--         (absent on a wallet loaded before changes existed: none applied)
-- ARGV    per change, ascending: seq, delta_micros (signed integer string),
--         status ('' when unchanged)
-- Returns {'ok', q, q_before}: the last change now applied, and the last one
-- applied before this call (so the caller counts only its own); or {'missing'} when the
-- wallet is not in Redis: the caller loads it from the ledger, which already
-- holds every committed change, and sets q to match.
--
-- Changes commit in seq order (each takes the next number under the wallet's
-- row lock), so a change is applied only right after its predecessor; one
-- already applied is skipped; a gap stops the batch until it is filled.

local wallet = redis.call('HMGET', KEYS[1], 'b', 'o', 's', 'c', 'e', 'q')
if not (wallet[1] and wallet[2] and wallet[3] and wallet[4] and wallet[5]) then
    return {'missing'}
end
local applied = tonumber(wallet[6] or '0')
local first_applied = applied
for i = 1, #ARGV / 3 do
    local seq = tonumber(ARGV[3 * i - 2])
    if seq == applied + 1 then
        redis.call('HINCRBY', KEYS[1], 'b', ARGV[3 * i - 1])
        if ARGV[3 * i] ~= '' then
            redis.call('HSET', KEYS[1], 's', ARGV[3 * i])
        end
        applied = seq
    elseif seq > applied + 1 then
        break
    end
end
if applied ~= first_applied then
    redis.call('HSET', KEYS[1], 'q', string.format('%d', applied))
end
return {'ok', string.format('%d', applied), string.format('%d', first_applied)}

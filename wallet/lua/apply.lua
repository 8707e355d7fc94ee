-- Debit or credit a wallet, atomically, once per idempotency key.
--
-- KEYS[1] wallet hash     {b = balance, p = credits charged but not yet committed,
--                          o = overdraft limit, s = status, c = currency,
--                          e = epoch: changes each time the wallet is loaded from the ledger}
--                          A credit is not spendable until committed: it waits in p.
-- KEYS[2] idempotency     {h = request hash, id = entry id, e = payload, b = balance after,
--                          x = outbox stream id, st = ok | reversed, c = currency}, expires after ARGV[6] s
-- KEYS[3] outbox stream   entries written here and not yet committed to the ledger
-- KEYS[4] abandoned hash  entry id -> entry, answered 503 before its commit was known
-- ARGV[1] kind: debit | credit        ARGV[2] amount_micros (integer string, >= 1)
-- ARGV[3] request hash                ARGV[4] entry id
-- ARGV[5] payload (JSON)              ARGV[6] idempotency ttl_s
-- ARGV[7] largest balance magnitude (2^53 - 1)
--
-- Returns one of:
--   {'ok', balance_after, outbox_id, currency, epoch}  charged; now write it through
--   {'replay', balance_after, payload, currency}  the key's earlier result
--   {'in_progress'}                               the key's request is still being committed
--   {'conflict'}                                  the key was used with another request
--   {'reversed', payload}                         the key's request failed and was reversed
--   {'missing'}                                   the wallet is not in Redis: load it, retry
--   {'frozen', balance} | {'insufficient', balance} | {'too_large', balance}

local record = redis.call('HMGET', KEYS[2], 'h', 'id', 'e', 'b', 'x', 'st', 'c')
if record[1] then
    if record[1] ~= ARGV[3] then
        return {'conflict'}
    end
    if record[6] == 'reversed' then
        return {'reversed', record[3]}
    end
    -- x is '' for a record restored from the ledger: committed, not pending.
    if (record[5] ~= '' and #redis.call('XRANGE', KEYS[3], record[5], record[5]) > 0)
        or redis.call('HEXISTS', KEYS[4], record[2]) == 1 then
        return {'in_progress'}
    end
    return {'replay', record[4], record[3], record[7]}
end

local amount = tonumber(ARGV[2])
if (ARGV[1] ~= 'debit' and ARGV[1] ~= 'credit') or not amount or amount < 1 or amount > tonumber(ARGV[7])
    or amount ~= math.floor(amount) then
    return redis.error_reply('apply: bad kind or amount')
end

local wallet = redis.call('HMGET', KEYS[1], 'b', 'o', 's', 'c', 'p', 'e')
if not (wallet[1] and wallet[2] and wallet[3] and wallet[4] and wallet[6]) then
    return {'missing'}
end
local balance = tonumber(wallet[1])
local pending = tonumber(wallet[5] or '0')
local after_text
if ARGV[1] == 'debit' then
    if wallet[3] ~= 'active' then
        return {'frozen', wallet[1]}
    end
    -- Exact in doubles: |balance|, amount, overdraft <= 2^53 - 1, and a result
    -- below -2^53 is refused whichever way it rounds.
    if balance - amount < -tonumber(wallet[2]) then
        return {'insufficient', wallet[1]}
    end
    local after = redis.call('HINCRBY', KEYS[1], 'b', '-' .. ARGV[2])
    after_text = string.format('%.0f', after)
else
    if balance + pending + amount > tonumber(ARGV[7]) then
        return {'too_large', wallet[1]}
    end
    local pending_after = redis.call('HINCRBY', KEYS[1], 'p', ARGV[2])
    after_text = string.format('%.0f', balance + pending_after)
end

local outbox_id = redis.call('XADD', KEYS[3], '*', 'e', ARGV[5], 'b', after_text, 'c', wallet[4], 'w', wallet[6])
redis.call('HSET', KEYS[2], 'h', ARGV[3], 'id', ARGV[4], 'e', ARGV[5], 'b', after_text, 'x', outbox_id, 'st', 'ok', 'c', wallet[4])
redis.call('EXPIRE', KEYS[2], ARGV[6])
return {'ok', after_text, outbox_id, wallet[4], wallet[6]}

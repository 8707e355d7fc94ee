-- Debit or credit wallets of one partition, each item atomically and once
-- per idempotency key. One item is a single debit; many are a batch
-- (POST /v1/debits/batch), each item still decided on its own.
--
-- KEYS[1] outbox stream   entries written here and not yet committed to the ledger
-- KEYS[2] abandoned hash  entry id -> entry, answered 503 before its commit was known
-- Per item i (from 1): KEYS[2i + 1] wallet hash, KEYS[2i + 2] idempotency record
--   wallet hash   {b = balance, p = credits charged but not yet committed,
--                  h = held by active holds (wallet/lua/hold.lua), n = their number,
--                  o = overdraft limit,
--                  s = status, c = currency,
--                  e = epoch: changes each time the wallet is loaded from the ledger}
--                  A credit is not spendable until committed: it waits in p.
--   idempotency   {h = request hash, id = entry id, e = payload, b = balance after,
--                  x = outbox stream id, st = ok | reversed, c = currency}, expires after ARGV[1] s
-- ARGV[1] idempotency ttl_s   ARGV[2] largest balance magnitude (2^53 - 1)
-- Per item i: ARGV[5i - 2] kind: debit | credit   ARGV[5i - 1] amount_micros (integer string, >= 1)
--             ARGV[5i] request hash   ARGV[5i + 1] entry id   ARGV[5i + 2] payload (JSON)
--
-- Returns, per item, one of:
--   {'ok', balance_after, outbox_id, currency, epoch}  charged; now write it through
--   {'replay', balance_after, payload, currency}  the key's earlier result
--   {'in_progress'}                               the key's request is still being committed
--   {'conflict'}                                  the key was used with another request
--   {'reversed', payload}                         the key's request failed and was reversed
--   {'missing'}                                   the wallet is not in Redis: load it, retry
--   {'frozen', balance} | {'insufficient', balance} | {'too_large', balance}

local largest = tonumber(ARGV[2])
local count = (#KEYS - 2) / 2
if count < 1 or count ~= math.floor(count) or #ARGV ~= 2 + 5 * count then
    return redis.error_reply('apply: keys and arguments do not match')
end
-- Every item is checked before any is applied: an error reply must leave nothing half done.
for i = 1, count do
    local kind, amount = ARGV[5 * i - 2], tonumber(ARGV[5 * i - 1])
    if (kind ~= 'debit' and kind ~= 'credit') or not amount or amount < 1 or amount > largest
        or amount ~= math.floor(amount) then
        return redis.error_reply('apply: bad kind or amount')
    end
end

local function apply(wallet_key, record_key, kind, amount_text, request_hash, entry_id, payload)
    local record = redis.call('HMGET', record_key, 'h', 'id', 'e', 'b', 'x', 'st', 'c')
    if record[1] then
        if record[1] ~= request_hash then
            return {'conflict'}
        end
        if record[6] == 'reversed' then
            return {'reversed', record[3]}
        end
        -- x is '' for a record restored from the ledger: committed, not pending.
        if (record[5] ~= '' and #redis.call('XRANGE', KEYS[1], record[5], record[5]) > 0)
            or redis.call('HEXISTS', KEYS[2], record[2]) == 1 then
            return {'in_progress'}
        end
        return {'replay', record[4], record[3], record[7]}
    end

    local amount = tonumber(amount_text)
    local wallet = redis.call('HMGET', wallet_key, 'b', 'o', 's', 'c', 'p', 'e', 'h')
    if not (wallet[1] and wallet[2] and wallet[3] and wallet[4] and wallet[6]) then
        return {'missing'}
    end
    local balance = tonumber(wallet[1])
    local after_text
    if kind == 'debit' then
        if wallet[3] ~= 'active' then
            return {'frozen', wallet[1]}
        end
        -- Exact in doubles: |balance|, held, amount, overdraft <= 2^53 - 1, and
        -- a result below -2^53 is refused whichever way it rounds.
        if balance - tonumber(wallet[7] or '0') - amount < -tonumber(wallet[2]) then
            return {'insufficient', wallet[1]}
        end
        local after = redis.call('HINCRBY', wallet_key, 'b', '-' .. amount_text)
        after_text = string.format('%.0f', after)
    else
        if balance + tonumber(wallet[5] or '0') + amount > largest then
            return {'too_large', wallet[1]}
        end
        local pending_after = redis.call('HINCRBY', wallet_key, 'p', amount_text)
        after_text = string.format('%.0f', balance + pending_after)
    end

    local outbox_id = redis.call('XADD', KEYS[1], '*', 'e', payload, 'b', after_text, 'c', wallet[4], 'w', wallet[6])
    redis.call('HSET', record_key, 'h', request_hash, 'id', entry_id, 'e', payload, 'b', after_text, 'x', outbox_id,
        'st', 'ok', 'c', wallet[4])
    redis.call('EXPIRE', record_key, ARGV[1])
    return {'ok', after_text, outbox_id, wallet[4], wallet[6]}
end

local results = {}
for i = 1, count do
    results[i] = apply(KEYS[2 * i + 1], KEYS[2 * i + 2], ARGV[5 * i - 2], ARGV[5 * i - 1], ARGV[5 * i],
        ARGV[5 * i + 1], ARGV[5 * i + 2])
end
return results

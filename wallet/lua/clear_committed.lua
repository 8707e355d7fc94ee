-- Settle entries the ledger has committed: remove each from the outbox and
-- make a committed credit spendable (move it from p to b).
--
-- KEYS[1] outbox stream   KEYS[2] abandoned hash   KEYS[3..] the wallet hash of each entry
-- ARGV    per entry: outbox id, entry id, credit amount (0 for a debit), the
--         wallet's epoch when charged (a wallet loaded again from the ledger
--         since then holds no pending credit of it: nothing to move)
-- Returns per entry: 1 settled by this call; 2 abandoned first (its client
-- got 503; the sweeper reverses it); 0 already settled by someone else.

local results = {}
for i = 1, #ARGV / 4 do
    local outbox_id, entry_id, credit, epoch = ARGV[4 * i - 3], ARGV[4 * i - 2], ARGV[4 * i - 1], ARGV[4 * i]
    if redis.call('XDEL', KEYS[1], outbox_id) == 1 then
        local wallet = KEYS[2 + i]
        if credit ~= '0' and redis.call('HGET', wallet, 'e') == epoch then
            redis.call('HINCRBY', wallet, 'p', '-' .. credit)
            redis.call('HINCRBY', wallet, 'b', credit)
        end
        results[i] = 1
    elseif redis.call('HEXISTS', KEYS[2], entry_id) == 1 then
        results[i] = 2
    else
        results[i] = 0
    end
end
return results

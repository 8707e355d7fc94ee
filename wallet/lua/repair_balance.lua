-- Set a wallet's Redis balance to its ledger balance, only if nothing has
-- moved it since the caller read both, and no charge of it is in flight.
--
-- KEYS[1] wallet hash   KEYS[2] the partition's outbox stream   KEYS[3] its abandoned hash
-- ARGV[1] wallet id                 ARGV[2] balance (b) the caller read before the ledger
-- ARGV[3] last change applied (q) then   ARGV[4] the ledger balance
-- ARGV[5] most outbox and abandoned entries to look through
-- Returns 'repaired'; 'moved' (b, q or pending credits changed, or a credit
-- is pending); 'busy' (an entry of this wallet is in the outbox or abandoned,
-- or too many entries to look through); 'missing'.

local wallet = redis.call('HMGET', KEYS[1], 'b', 'p', 'q')
if not wallet[1] then
    return 'missing'
end
if wallet[1] ~= ARGV[2] or (wallet[3] or '0') ~= ARGV[3] or tonumber(wallet[2] or '0') ~= 0 then
    return 'moved'
end
local limit = tonumber(ARGV[5])
if redis.call('XLEN', KEYS[2]) > limit or redis.call('HLEN', KEYS[3]) > limit then
    return 'busy'
end
for _, entry in ipairs(redis.call('XRANGE', KEYS[2], '-', '+')) do
    local fields = entry[2]
    for i = 1, #fields, 2 do
        if fields[i] == 'e' and string.find(fields[i + 1], ARGV[1], 1, true) then
            return 'busy'
        end
    end
end
for _, value in ipairs(redis.call('HVALS', KEYS[3])) do
    if string.find(value, ARGV[1], 1, true) then
        return 'busy'
    end
end
redis.call('HSET', KEYS[1], 'b', ARGV[4])
return 'repaired'

-- Put a wallet into Redis from the ledger.
--
-- KEYS[1] wallet hash
-- ARGV[1] balance_micros   ARGV[2] overdraft_limit_micros   ARGV[3] status   ARGV[4] currency
-- ARGV[5] '1' to overwrite (rebuild-cache), '0' to load only if absent or partial
-- ARGV[6] a new epoch: charges made before this load are not undone into it
-- ARGV[7] the last Postgres-first change the ledger balance includes (q):
--         apply_changes.lua applies only later ones
-- Returns 1 if written, 0 if it was already there, 2 if asked to overwrite a
-- wallet that has applied later changes than ARGV[7] (the caller's ledger
-- snapshot is older than Redis: read it again, or a change would be lost).

if ARGV[5] == '0' then
    local wallet = redis.call('HMGET', KEYS[1], 'b', 'o', 's', 'c', 'e')
    if wallet[1] and wallet[2] and wallet[3] and wallet[4] and wallet[5] then
        return 0
    end
end
if ARGV[5] == '1' and tonumber(redis.call('HGET', KEYS[1], 'q') or '0') > tonumber(ARGV[7]) then
    return 2
end
-- What active holds reserve (h) and how many they are (n) live only in
-- Redis, beside the holds themselves (wallet/lua/hold.lua): a load from the
-- ledger keeps both.
local holds = redis.call('HMGET', KEYS[1], 'h', 'n')
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'b', ARGV[1], 'p', '0', 'o', ARGV[2], 's', ARGV[3], 'c', ARGV[4], 'e', ARGV[6], 'q', ARGV[7])
if holds[1] then
    redis.call('HSET', KEYS[1], 'h', holds[1])
end
if holds[2] then
    redis.call('HSET', KEYS[1], 'n', holds[2])
end
return 1

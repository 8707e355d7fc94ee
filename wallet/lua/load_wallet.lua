-- Put a wallet into Redis from the ledger.
--
-- KEYS[1] wallet hash
-- ARGV[1] balance_micros   ARGV[2] overdraft_limit_micros   ARGV[3] status   ARGV[4] currency
-- ARGV[5] '1' to overwrite (rebuild-cache), '0' to load only if absent
-- Returns 1 if written, 0 if it was already there.

if ARGV[5] == '0' and redis.call('EXISTS', KEYS[1]) == 1 then
    return 0
end
redis.call('HSET', KEYS[1], 'b', ARGV[1], 'o', ARGV[2], 's', ARGV[3], 'c', ARGV[4])
return 1

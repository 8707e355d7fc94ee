-- After the sweeper wrote an abandoned entry and its reversal to the ledger:
-- refund the wallet once and mark the key as reversed.
--
-- KEYS[1] wallet hash   KEYS[2] idempotency record   KEYS[3] abandoned hash
-- ARGV[1] entry id      ARGV[2] delta to apply (signed integer string)
-- Returns 1 if this call refunded, 0 if already settled.

if redis.call('HDEL', KEYS[3], ARGV[1]) == 0 then
    return 0
end
redis.call('HINCRBY', KEYS[1], 'b', ARGV[2])
if redis.call('HGET', KEYS[2], 'id') == ARGV[1] then
    redis.call('HSET', KEYS[2], 'st', 'reversed')
end
return 1

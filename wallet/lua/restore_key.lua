-- Restore an idempotency record from the ledger (rebuild-cache), unless one
-- is there already. The entry is committed, so it has no outbox id.
--
-- KEYS[1] idempotency record
-- ARGV[1] request hash   ARGV[2] entry id   ARGV[3] payload (JSON)   ARGV[4] balance after
-- ARGV[5] currency       ARGV[6] state: ok | reversed               ARGV[7] ttl_s left
-- Returns 1 if restored, 0 if a record was there. A record of the same entry
-- (from an old snapshot) takes the ledger's state: committed, maybe reversed.

if redis.call('EXISTS', KEYS[1]) == 1 then
    if redis.call('HGET', KEYS[1], 'id') == ARGV[2] then
        redis.call('HSET', KEYS[1], 'st', ARGV[6], 'x', '')
    end
    return 0
end
redis.call('HSET', KEYS[1], 'h', ARGV[1], 'id', ARGV[2], 'e', ARGV[3], 'b', ARGV[4], 'x', '', 'st', ARGV[6], 'c', ARGV[5])
redis.call('EXPIRE', KEYS[1], ARGV[7])
return 1

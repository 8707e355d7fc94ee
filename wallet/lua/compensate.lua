-- Undo a charge whose ledger write definitely failed, or whose key another
-- entry already holds in the ledger. Idempotent: only the caller that removes
-- the outbox entry applies the refund.
--
-- KEYS[1] wallet hash   KEYS[2] idempotency record   KEYS[3] outbox stream
-- ARGV[1] outbox id     ARGV[2] delta to apply (signed integer string)   ARGV[3] entry id
-- Returns 1 if this call undid the charge, 0 if someone already settled it.

if redis.call('XDEL', KEYS[3], ARGV[1]) == 0 then
    return 0
end
redis.call('HINCRBY', KEYS[1], 'b', ARGV[2])
if redis.call('HGET', KEYS[2], 'id') == ARGV[3] then
    redis.call('DEL', KEYS[2])
end
return 1

-- Undo a charge whose ledger write definitely failed, or whose key another
-- entry already holds in the ledger. Idempotent: only the caller that removes
-- the outbox entry undoes the charge.
--
-- KEYS[1] wallet hash   KEYS[2] idempotency record   KEYS[3] outbox stream
-- ARGV[1] outbox id     ARGV[2] field to undo (b: a debit, p: a pending credit)
-- ARGV[3] delta (signed integer string)   ARGV[4] entry id
-- ARGV[5] the wallet's epoch when charged
-- Returns 1 if this call undid the charge, 0 if someone already settled it.
-- The undo applies only to the wallet as it was charged (same epoch): a
-- wallet lost and loaded again from the ledger never held this charge, and
-- a missing wallet is not recreated.

if redis.call('XDEL', KEYS[3], ARGV[1]) == 0 then
    return 0
end
if redis.call('HGET', KEYS[1], 'e') == ARGV[5] then
    redis.call('HINCRBY', KEYS[1], ARGV[2], ARGV[3])
end
if redis.call('HGET', KEYS[2], 'id') == ARGV[4] then
    redis.call('DEL', KEYS[2])
end
return 1

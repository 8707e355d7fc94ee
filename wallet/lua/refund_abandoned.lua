-- After the sweeper settled an abandoned entry in the ledger (written with
-- its reversal, or found its key held by another entry): undo the charge in
-- Redis once and tell later retries what happened.
--
-- KEYS[1] wallet hash   KEYS[2] idempotency record   KEYS[3] abandoned hash
-- ARGV[1] entry id      ARGV[2] field to undo (b or p)   ARGV[3] delta (signed integer string)
-- ARGV[4] 'reversed': mark the key reversed; 'forget': delete the record, so
--         a retry meets the ledger's holder of the key and replays it.
-- ARGV[5] the wallet's epoch when charged: the undo applies only to that wallet
--         (one loaded again from the ledger never held the charge).
-- Returns 1 if this call undid the charge, 0 if already settled.

if redis.call('HDEL', KEYS[3], ARGV[1]) == 0 then
    return 0
end
if redis.call('HGET', KEYS[1], 'e') == ARGV[5] then
    redis.call('HINCRBY', KEYS[1], ARGV[2], ARGV[3])
end
if redis.call('HGET', KEYS[2], 'id') == ARGV[1] then
    if ARGV[4] == 'reversed' then
        redis.call('HSET', KEYS[2], 'st', 'reversed')
    else
        redis.call('DEL', KEYS[2])
    end
end
return 1

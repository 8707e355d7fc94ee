-- Hand an entry whose commit outcome is unknown to the sweeper: the client
-- was (or is about to be) answered 503, so the entry must end up uncharged.
-- The sweeper writes it and its reversal to the ledger, then refunds Redis.
--
-- KEYS[1] idempotency record   KEYS[2] outbox stream   KEYS[3] abandoned hash
-- ARGV[1] entry id             ARGV[2] outbox id, or '' to read it from the record
-- Returns 1 if abandoned now, 0 if the entry was already settled (committed,
-- compensated) or never charged.

local outbox_id = ARGV[2]
if outbox_id == '' then
    local record = redis.call('HMGET', KEYS[1], 'id', 'x')
    if record[1] ~= ARGV[1] then
        return 0
    end
    outbox_id = record[2]
    if not outbox_id or outbox_id == '' then
        return 0
    end
end
local found = redis.call('XRANGE', KEYS[2], outbox_id, outbox_id)
if #found == 0 then
    return 0
end
local fields = found[1][2]
local entry = {}
for i = 1, #fields, 2 do
    entry[fields[i]] = fields[i + 1]
end
redis.call('XDEL', KEYS[2], outbox_id)
redis.call('HSET', KEYS[3], ARGV[1], cjson.encode(entry))
return 1

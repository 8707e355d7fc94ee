-- What reconciling a wallet's balance needs to know of Redis, read at once.
--
-- KEYS[1] wallet hash   KEYS[2] the partition's outbox stream   KEYS[3] its abandoned hash
-- ARGV[1] wallet id     ARGV[2] most outbox and abandoned entries to look through
-- Returns {b, p, q, outbox last generated id, busy} with b = '' when the
-- wallet is absent; busy = 1 when an entry of this wallet is in the outbox
-- or abandoned (a charge in flight), or there are too many to look through.

local wallet = redis.call('HMGET', KEYS[1], 'b', 'p', 'q')
local last_id = '0-0'
local ok, info = pcall(redis.call, 'XINFO', 'STREAM', KEYS[2])
if ok then
    for i = 1, #info, 2 do
        if info[i] == 'last-generated-id' then
            last_id = info[i + 1]
        end
    end
end
local busy = 0
local limit = tonumber(ARGV[2])
if redis.call('XLEN', KEYS[2]) > limit or redis.call('HLEN', KEYS[3]) > limit then
    busy = 1
else
    for _, entry in ipairs(redis.call('XRANGE', KEYS[2], '-', '+')) do
        local fields = entry[2]
        for i = 1, #fields, 2 do
            if fields[i] == 'e' and string.find(fields[i + 1], ARGV[1], 1, true) then
                busy = 1
            end
        end
    end
    for _, value in ipairs(redis.call('HVALS', KEYS[3])) do
        if string.find(value, ARGV[1], 1, true) then
            busy = 1
        end
    end
end
return {wallet[1] or '', wallet[2] or '0', wallet[3] or '0', last_id, busy}

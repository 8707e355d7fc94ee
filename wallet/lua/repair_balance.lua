-- Set a wallet's Redis balance to its ledger balance, only if nothing has
-- touched it, or charged anything in its partition, since drift_probe.lua
-- read it (before the caller read the ledger).
--
-- KEYS[1] wallet hash   KEYS[2] the partition's outbox stream
-- ARGV[1] balance (b) probed   ARGV[2] last change applied (q) probed
-- ARGV[3] the outbox's last generated id probed   ARGV[4] the ledger balance
-- Returns 'repaired', 'moved' (b, q or pending credits changed, or anything
-- was charged in the partition since the probe), or 'missing'.
--
-- Why the outbox id: every charge appends to it before its commit, so an
-- unchanged id means no charge of this wallet began after the probe; the
-- probe found none in flight; so the ledger, read after the probe, holds
-- every charge that b holds.

local wallet = redis.call('HMGET', KEYS[1], 'b', 'p', 'q')
if not wallet[1] then
    return 'missing'
end
if wallet[1] ~= ARGV[1] or (wallet[3] or '0') ~= ARGV[2] or tonumber(wallet[2] or '0') ~= 0 then
    return 'moved'
end
local last_id = '0-0'
local ok, info = pcall(redis.call, 'XINFO', 'STREAM', KEYS[2])
if ok then
    for i = 1, #info, 2 do
        if info[i] == 'last-generated-id' then
            last_id = info[i + 1]
        end
    end
end
if last_id ~= ARGV[3] then
    return 'moved'
end
redis.call('HSET', KEYS[1], 'b', ARGV[4])
return 'repaired'

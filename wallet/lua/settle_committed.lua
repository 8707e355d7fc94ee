-- Remove committed entries from the outbox. An entry already gone was
-- abandoned first (its client got 503): the sweeper reverses it.
--
-- KEYS[1] outbox stream   ARGV outbox ids
-- Returns, per id, 1 if this call removed it, else 0.

local removed = {}
for i = 1, #ARGV do
    removed[i] = redis.call('XDEL', KEYS[1], ARGV[i])
end
return removed

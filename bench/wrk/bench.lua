-- The wrk script of `make bench` (bench/driver.py sets the environment):
--   BENCH_PATH      the path; "{wallet}" is replaced by a wallet id of BENCH_WALLETS
--   BENCH_WALLETS   a file of wallet ids, one per line (a path without "{wallet}" needs none)
--   BENCH_KEY       an API key (debit scope), sent as a bearer token
--   BENCH_RUN       the prefix of this run's idempotency keys
--   BENCH_KEYS_OUT  if set, each thread writes the idempotency key of every 201 to
--                   BENCH_KEYS_OUT.<thread>, so the driver can match answers to the ledger
--   BENCH_DELAY_MS  if set, each connection pauses before each request, this long on average
--                   (exponentially distributed: see delay() below)
--   BENCH_BATCH_ITEMS  if set, each request is a POST /v1/debits/batch of this many
--                   debits over BENCH_WALLETS (BENCH_PATH is then ignored)
-- By hand:
--   BENCH_PATH=/v1/wallets/{wallet}/debits BENCH_WALLETS=bench/results/wallets.txt \
--   BENCH_KEY=<debit key> BENCH_RUN=manual wrk -t1 -c64 -d20s -s bench/wrk/bench.lua http://127.0.0.1:8000
-- done() prints one JSON line with the rate, the latency percentiles and the errors.

local threads = {}
function setup(thread)
    threads[#threads + 1] = thread
    thread:set("thread_number", #threads)
end

local wallets = {}
local path_template = ""
local run = ""
local counter = 0
local keys_file = nil
local batch_items = tonumber(os.getenv("BENCH_BATCH_ITEMS") or "0") or 0

function init(args)
    math.randomseed(os.time() * 1000 + thread_number)
    path_template = os.getenv("BENCH_PATH") or "/bench/floor"
    run = (os.getenv("BENCH_RUN") or "manual") .. "-" .. tostring(thread_number) .. "-"
    if batch_items > 0 or string.find(path_template, "{wallet}", 1, true) then
        for line in io.lines(os.getenv("BENCH_WALLETS") or "bench/results/wallets.txt") do
            if #line > 0 then wallets[#wallets + 1] = line end
        end
    end
    local keys_out = os.getenv("BENCH_KEYS_OUT")
    if keys_out and #keys_out > 0 then
        keys_file = io.open(keys_out .. "." .. tostring(thread_number), "w")
    end
    wrk.method = "POST"
    wrk.headers["Content-Type"] = "application/json"
    local key = os.getenv("BENCH_KEY")
    if key and #key > 0 then wrk.headers["Authorization"] = "Bearer " .. key end
    wrk.body = '{"amount_micros":1000,"description":"bench"}'
end

local function batch_request()
    local items = {}
    for i = 1, batch_items do
        local wallet = wallets[((counter * 7919 + i * 104729) % #wallets) + 1]
        items[i] = '{"wallet_id":"' .. wallet .. '","amount_micros":1000,"idempotency_key":"'
            .. run .. tostring(counter) .. "-" .. tostring(i) .. '"}'
    end
    wrk.headers["Idempotency-Key"] = run .. tostring(counter)
    return wrk.format(nil, "/v1/debits/batch", nil, '{"debits":[' .. table.concat(items, ",") .. "]}")
end

function request()
    counter = counter + 1
    if batch_items > 0 then return batch_request() end
    local path = path_template
    if #wallets > 0 then
        -- a multiplicative step spreads consecutive requests over the wallets
        local wallet = wallets[((counter * 7919) % #wallets) + 1]
        path = string.gsub(path_template, "{wallet}", wallet, 1)
    end
    wrk.headers["Idempotency-Key"] = run .. tostring(counter)
    return wrk.format(nil, path)
end

if (os.getenv("BENCH_KEYS_OUT") or "") ~= "" then
    function response(status, headers, body)
        if status == 201 then
            local key = string.match(body, '"idempotency_key":"([^"]+)"')
            if key then keys_file:write(key, "\n") end
        elseif status == 200 and batch_items > 0 then
            -- only a charged item (status 201) carries an entry, and with it its key
            for key in string.gmatch(body, '"idempotency_key":"([^"]+)"') do
                keys_file:write(key, "\n")
            end
        end
    end
end

local delay_ms = tonumber(os.getenv("BENCH_DELAY_MS") or "0") or 0
if delay_ms > 0 then
    -- Exponentially distributed pauses with this mean, not a fixed one: with
    -- a fixed pause the connections stay in step and send in bursts (all of
    -- them within a millisecond, then silence), which measures the queue a
    -- burst builds, not the service at half load. Random pauses spread the
    -- requests out as independent clients do (Poisson arrivals). Capped at
    -- DELAY_MEANS_MAX means, so one draw cannot stall a connection.
    local DELAY_MEANS_MAX = 8
    function delay()
        local u = math.random()
        return math.min(-delay_ms * math.log(1 - u), DELAY_MEANS_MAX * delay_ms)
    end
end

function done(summary, latency, requests)
    local seconds = summary.duration / 1e6
    local e = summary.errors
    io.write(string.format(
        '{"requests": %d, "duration_s": %.3f, "rps": %.1f, "p50_ms": %.3f, "p90_ms": %.3f, '
            .. '"p99_ms": %.3f, "max_ms": %.3f, "non_2xx": %d, "socket_errors": %d, "timeouts": %d}\n',
        summary.requests, seconds, summary.requests / seconds,
        latency:percentile(50) / 1000, latency:percentile(90) / 1000, latency:percentile(99) / 1000,
        latency.max / 1000, e.status, e.connect + e.read + e.write, e.timeout))
end

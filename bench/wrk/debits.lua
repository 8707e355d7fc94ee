-- wrk script: debits with unique idempotency keys, spread over the wallets
-- listed one per line in $WALLETS (default bench/results/wallets.txt).
--   CENTIME_KEY=<debit key> wrk -t2 -c64 -d20s -s bench/wrk/debits.lua http://127.0.0.1:8000

local threads_started = 0
function setup(thread)
    threads_started = threads_started + 1
    thread:set("thread_number", threads_started)
end

local wallets = {}
local counter = 0
local thread_tag = ""

function init(args)
    local path = os.getenv("WALLETS") or "bench/results/wallets.txt"
    for line in io.lines(path) do
        if #line > 0 then wallets[#wallets + 1] = line end
    end
    thread_tag = tostring(os.time()) .. "-" .. tostring(thread_number)
    wrk.method = "POST"
    wrk.headers["Content-Type"] = "application/json"
    wrk.headers["Authorization"] = "Bearer " .. os.getenv("CENTIME_KEY")
    wrk.body = '{"amount_micros":1000,"description":"bench"}'
end

function request()
    counter = counter + 1
    local wallet = wallets[(counter % #wallets) + 1]
    wrk.headers["Idempotency-Key"] = thread_tag .. "-" .. counter
    return wrk.format(nil, "/v1/wallets/" .. wallet .. "/debits")
end

function done(summary, latency, requests)
    io.write(string.format("p50 %.2f ms, p99 %.2f ms, %d requests, %.0f req/s\n",
        latency:percentile(50) / 1000, latency:percentile(99) / 1000,
        summary.requests, summary.requests / (summary.duration / 1e6)))
end

-- wrk script for scripts/bench-scenarios: non-streamed chat completions whose
-- bodies are all different (a cache miss every time), and one summary line
-- ("BENCH {json}") when done.
--
--   wrk ... URL -- SALT
--
-- Each body carries SALT (unique per wrk run, so that no run repeats an
-- earlier run's bodies), the wrk thread's number and a per-thread counter.
local next_tid = 1

function setup(thread)
  thread:set("tid", next_tid)
  next_tid = next_tid + 1
end

function init(args)
  salt = args[1] or tostring(os.time())
  n = 0
  headers = { ["Content-Type"] = "application/json" }
end

function request()
  n = n + 1
  local body = '{"model":"bench","messages":[{"role":"user","content":"Say hello to the benchmark. ' ..
    salt .. '-' .. tid .. '-' .. n .. '"}],"max_tokens":16}'
  return wrk.format("POST", "/v1/chat/completions", headers, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests":%d,"duration_us":%d,"rps":%.2f,"p50_us":%d,"p90_us":%d,"p99_us":%d,' ..
    '"mean_us":%.2f,"err_connect":%d,"err_read":%d,"err_write":%d,"err_status":%d,"err_timeout":%d}\n',
    summary.requests, summary.duration, summary.requests / (summary.duration / 1e6),
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean,
    e.connect, e.read, e.write, e.status, e.timeout))
end

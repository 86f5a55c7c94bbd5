-- wrk script for scripts/bench-scenarios: one fixed request, chosen by the
-- first script argument (wrk ... URL -- MODE), and one machine-readable
-- summary line ("BENCH {json}") when done.
--
--   chat             non-streamed chat completion (as chat.lua)
--   chat_stream      streamed chat completion
--   responses        streamed Responses API request (POST /v1/responses)
--   messages         streamed Anthropic Messages request (POST /v1/messages)
--
-- Extra headers (e.g. authorization) come from wrk's -H.
local bodies = {
  chat = { "/v1/chat/completions",
    '{"model":"bench","messages":[{"role":"user","content":"Say hello to the benchmark."}],"max_tokens":16}' },
  chat_stream = { "/v1/chat/completions",
    '{"model":"bench","messages":[{"role":"user","content":"hi"}],"stream":true}' },
  responses = { "/v1/responses",
    '{"model":"bench","input":"hi","stream":true}' },
  messages = { "/v1/messages",
    '{"model":"bench","max_tokens":64,"stream":true,"messages":[{"role":"user","content":"hi"}]}' },
}

function init(args)
  local mode = args[1] or "chat"
  local b = bodies[mode]
  if b == nil then
    io.stderr:write("scenario.lua: unknown mode " .. mode .. "\n")
    os.exit(2)
  end
  wrk.method = "POST"
  wrk.path = b[1]
  wrk.body = b[2]
  wrk.headers["Content-Type"] = "application/json"
  if mode == "messages" then
    wrk.headers["anthropic-version"] = "2023-06-01"
  end
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

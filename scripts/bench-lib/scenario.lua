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

-- The summary line, shared by every script here (this file's folder is
-- found from its own path, which wrk passes to Lua).
done = dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "summary.lua")

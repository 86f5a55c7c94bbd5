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

-- The summary line, shared by every script here (this file's folder is
-- found from its own path, which wrk passes to Lua).
done = dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "summary.lua")

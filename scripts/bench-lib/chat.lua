-- wrk script for scripts/bench: POST a small non-streamed chat completion and
-- print one machine-readable summary line ("BENCH {json}") when done.
wrk.method = "POST"
wrk.path = "/v1/chat/completions"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"bench","messages":[{"role":"user","content":"Say hello to the benchmark."}],"max_tokens":16}'

-- The summary line, shared by every script here (this file's folder is
-- found from its own path, which wrk passes to Lua).
done = dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "summary.lua")

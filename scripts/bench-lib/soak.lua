-- wrk script for scripts/soak: a mix of requests that fills every bounded
-- structure of the proxy (cache entries, Responses ids, rate-limit state,
-- connection state) and then keeps churning it, and one summary line
-- ("BENCH {json}") when done.
--
--   wrk ... URL -- SALT KEY_A KEY_B KEY_LIMITED
--
-- Request i of a thread is kind i mod #kinds below. Bodies carry SALT, the
-- thread's number and a per-thread counter, so that "unique" bodies are
-- cache misses and every Responses answer has a new id. Non-2xx answers are
-- expected from some kinds (429 for the limited key, 400 for bad JSON): wrk
-- counts them under err_status.
local next_tid = 1

function setup(thread)
  thread:set("tid", next_tid)
  next_tid = next_tid + 1
end

local function json_headers(key, extra)
  local h = { ["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. key }
  for k, v in pairs(extra or {}) do h[k] = v end
  return h
end

function init(args)
  salt = args[1] or tostring(os.time())
  key_a, key_b, key_limited = args[2], args[3], args[4]
  n = 0
  local anthropic = { ["anthropic-version"] = "2023-06-01" }
  kinds = {
    -- a cache miss, stored (fills the cache up to its bound, then evicts)
    function(u) return "POST", "/v1/chat/completions", json_headers(key_a),
      '{"model":"soak","messages":[{"role":"user","content":"miss ' .. u .. '"}],"max_tokens":16}' end,
    -- the same body every time: a cache hit
    function(u) return "POST", "/v1/chat/completions", json_headers(key_a),
      '{"model":"soak","messages":[{"role":"user","content":"the same question"}],"max_tokens":16}' end,
    -- a streamed cache miss, through the other key (its own cache scope)
    function(u) return "POST", "/v1/chat/completions", json_headers(key_b),
      '{"model":"soak","stream":true,"messages":[{"role":"user","content":"stream ' .. u .. '"}]}' end,
    -- a streamed Responses request: a new response id to remember
    function(u) return "POST", "/v1/responses", json_headers(key_a),
      '{"model":"soak","stream":true,"input":"responses ' .. u .. '"}' end,
    -- a non-streamed Responses request
    function(u) return "POST", "/v1/responses", json_headers(key_b),
      '{"model":"soak","input":"responses ' .. u .. '"}' end,
    -- Anthropic Messages, streamed
    function(u) return "POST", "/v1/messages", json_headers(key_a, anthropic),
      '{"model":"soak","max_tokens":32,"stream":true,"messages":[{"role":"user","content":"messages ' ..
      u .. '"}]}' end,
    -- a key over its rate limit: mostly 429
    function(u) return "POST", "/v1/chat/completions", json_headers(key_limited),
      '{"model":"soak","messages":[{"role":"user","content":"limited ' .. u .. '"}]}' end,
    -- malformed JSON: 400
    function(u) return "POST", "/v1/chat/completions", json_headers(key_a),
      '{"model":"soak","messages":[' end,
    -- the models list
    function(u) return "GET", "/v1/models", { ["Authorization"] = "Bearer " .. key_b }, nil end,
  }
end

function request()
  n = n + 1
  local method, path, headers, body = kinds[(n % #kinds) + 1](salt .. "-" .. tid .. "-" .. n)
  return wrk.format(method, path, headers, body)
end

-- The summary line, shared by every script here (this file's folder is
-- found from its own path, which wrk passes to Lua).
done = dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "summary.lua")

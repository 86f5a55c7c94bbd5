"""The official anthropic SDK against llm-proxy: run by tests/tests/sdk.rs.

usage: python anthropic_sdk.py BASE_URL   (the proxy's root, e.g. http://127.0.0.1:8080)
Keys and models are those of the config in sdk.rs.
"""
import sys

import anthropic

base = sys.argv[1]


def client(key="sk-ok"):
    return anthropic.Anthropic(base_url=base, api_key=key, max_retries=0, timeout=10)


messages = [{"role": "user", "content": "Hello from the anthropic SDK"}]
c = client()

# Non-streamed.
msg = c.messages.create(model="claude-ok", max_tokens=64, messages=messages)
assert msg.type == "message" and msg.content[0].text, msg
assert msg.usage.input_tokens > 0 and msg.usage.output_tokens > 0, msg.usage

# Streamed, with the SDK's stream helper.
with c.messages.stream(model="claude-ok", max_tokens=64, messages=messages) as stream:
    text = "".join(stream.text_stream)
    final = stream.get_final_message()
assert text == msg.content[0].text, (text, msg.content[0].text)
assert final.stop_reason == "end_turn" and final.usage.output_tokens > 0, final

# Raw streamed events.
events = [e.type for e in c.messages.create(model="claude-ok", max_tokens=64, messages=messages, stream=True)]
assert events[0] == "message_start" and events[-1] == "message_stop", events

# count_tokens.
counted = c.messages.count_tokens(model="claude-ok", messages=messages)
assert counted.input_tokens > 0, counted


def expect(exc, fn):
    try:
        fn()
    except exc as e:
        body = e.body if isinstance(e.body, dict) else {}
        assert body.get("type") == "error", body
        return e
    raise AssertionError(f"expected {exc.__name__}")


expect(anthropic.AuthenticationError, lambda: client("sk-wrong").messages.create(model="claude-ok", max_tokens=8, messages=messages))
expect(anthropic.PermissionDeniedError, lambda: c.messages.create(model="claude-other", max_tokens=8, messages=messages))
expect(anthropic.NotFoundError, lambda: client("sk-any").messages.create(model="no-such-model", max_tokens=8, messages=messages))
# Listing models: Anthropic's shape, the key's models only; its errors too.
models = list(c.models.list())
assert [m.id for m in models] == ["claude-ok", "claude-dead"], models
assert all(m.type == "model" and m.display_name == m.id and m.created_at for m in models), models
one = c.models.retrieve("claude-ok")
assert (one.type, one.id, one.display_name) == ("model", "claude-ok", "claude-ok"), one
expect(anthropic.NotFoundError, lambda: c.models.retrieve("claude-other"))
expect(anthropic.AuthenticationError, lambda: client("sk-wrong").models.list())
big = [{"role": "user", "content": "x" * 20000}]
expect(anthropic.RequestTooLargeError, lambda: c.messages.create(model="claude-ok", max_tokens=8, messages=big))
slow = client("sk-slow")
slow.messages.create(model="claude-ok", max_tokens=8, messages=messages)
e = expect(anthropic.RateLimitError, lambda: slow.messages.create(model="claude-ok", max_tokens=8, messages=messages))
assert int(e.response.headers["retry-after"]) >= 1
e = expect(anthropic.InternalServerError, lambda: c.messages.create(model="claude-dead", max_tokens=8, messages=messages))
assert e.status_code == 502, e.status_code
expect(anthropic.BadRequestError, lambda: c.messages.create(model="", max_tokens=8, messages=messages))

print("anthropic sdk: all checks passed")

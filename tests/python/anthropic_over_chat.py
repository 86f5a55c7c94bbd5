"""The official anthropic SDK against llm-proxy in front of a chat-only
upstream, so every request is translated (Messages -> chat completions and
back). Run by tests/tests/translate_e2e.rs.

usage: python anthropic_over_chat.py BASE_URL   (e.g. http://127.0.0.1:8080)
Exits non-zero with a traceback on the first failed check.
"""
import sys

import anthropic

base_url = sys.argv[1]
client = anthropic.Anthropic(base_url=base_url, api_key="sk-client-key", max_retries=0, timeout=10)
hello = [{"role": "user", "content": "Hello from the SDK"}]

# Non-streamed.
msg = client.messages.create(model="demo", max_tokens=100, system="Be brief.", messages=hello)
assert msg.type == "message" and msg.role == "assistant", msg
assert msg.content[0].type == "text" and msg.content[0].text, msg
assert msg.stop_reason == "end_turn", msg
assert msg.usage.input_tokens > 0 and msg.usage.output_tokens > 0, msg.usage

# Streamed, through the SDK's own event accumulator.
with client.messages.stream(model="demo", max_tokens=100, system="Be brief.", messages=hello) as stream:
    text = "".join(stream.text_stream)
    final = stream.get_final_message()
assert text == msg.content[0].text, (text, msg.content[0].text)
assert final.stop_reason == "end_turn", final
assert final.usage.output_tokens == msg.usage.output_tokens, final.usage
assert final.usage.input_tokens > 0, final.usage

# Raw events: the order clients rely on.
kinds = [e.type for e in client.messages.create(model="demo", max_tokens=100, messages=hello, stream=True)]
assert kinds[0] == "message_start" and kinds.count("message_start") == 1, kinds
assert kinds[-2:] == ["message_delta", "message_stop"], kinds
assert kinds.index("content_block_start") < kinds.index("content_block_delta"), kinds

# max_tokens caps the answer.
capped = client.messages.create(model="demo", max_tokens=3, messages=hello)
assert capped.stop_reason == "max_tokens" and capped.usage.output_tokens == 3, capped

# A tool call round trip.
tools = [{
    "name": "get_weather",
    "description": "The weather of a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}]
ask = {"role": "user", "content": "What's the weather in Paris?"}
first = client.messages.create(model="demo", max_tokens=100, tools=tools, messages=[ask])
assert first.stop_reason == "tool_use", first
use = next(b for b in first.content if b.type == "tool_use")
assert use.name == "get_weather" and use.input == {"city": "Paris"}, use
result = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "18C and sunny"}]}
second = client.messages.create(
    model="demo", max_tokens=100, tools=tools,
    messages=[ask, {"role": "assistant", "content": first.content}, result],
)
assert second.stop_reason == "end_turn" and second.content[0].type == "text", second

# The same tool call, streamed.
with client.messages.stream(model="demo", max_tokens=100, tools=tools, messages=[ask]) as stream:
    final = stream.get_final_message()
use = next(b for b in final.content if b.type == "tool_use")
assert use.input == {"city": "Paris"} and final.stop_reason == "tool_use", final

# What a chat server cannot do is a 400 in Anthropic's shape.
try:
    client.messages.create(
        model="demo", max_tokens=100, messages=hello,
        extra_body={"mcp_servers": [{"type": "url", "url": "https://mcp.example", "name": "x"}]},
    )
    raise AssertionError("expected BadRequestError")
except anthropic.BadRequestError as e:
    assert e.status_code == 400 and "mcp_servers" in str(e), e
    assert e.body["type"] == "error" and e.body["error"]["type"] == "invalid_request_error", e.body

print("anthropic sdk over a chat-only upstream: all checks passed")

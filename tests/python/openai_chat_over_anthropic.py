"""The openai SDK's chat client against llm-proxy in front of an upstream
that speaks only Anthropic's Messages API, so every request is translated
(chat completions -> Messages and back). Run by tests/tests/translate_e2e.rs.

usage: python openai_chat_over_anthropic.py BASE_URL   (e.g. http://127.0.0.1:8080/v1)
Exits non-zero with a traceback on the first failed check.
"""
import json
import sys

import openai
from openai import OpenAI

base_url = sys.argv[1]
client = OpenAI(base_url=base_url, api_key="sk-client-key", max_retries=0, timeout=10)
messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello from the SDK"}]

# Non-streamed.
chat = client.chat.completions.create(model="claude", messages=messages)
assert chat.object == "chat.completion", chat
assert chat.choices[0].message.content and chat.choices[0].finish_reason == "stop", chat
assert chat.usage.prompt_tokens > 0 and chat.usage.completion_tokens > 0, chat.usage

# Streamed, with usage.
stream = client.chat.completions.create(
    model="claude", messages=messages, stream=True, stream_options={"include_usage": True}
)
text, usage, finish = "", None, None
for chunk in stream:
    if chunk.choices:
        text += chunk.choices[0].delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
    if chunk.usage:
        usage = chunk.usage
assert text == chat.choices[0].message.content, (text, chat.choices[0].message.content)
assert finish == "stop", finish
assert usage is not None and usage.completion_tokens == chat.usage.completion_tokens, usage

# Without include_usage, no usage chunk.
chunks = list(client.chat.completions.create(model="claude", messages=messages, stream=True))
assert all(c.usage is None for c in chunks), chunks[-1]

# max_tokens caps the answer.
capped = client.chat.completions.create(model="claude", messages=messages, max_tokens=3)
assert capped.choices[0].finish_reason == "length" and capped.usage.completion_tokens == 3, capped

# A tool call round trip.
tools = [{"type": "function", "function": {
    "name": "get_weather",
    "description": "The weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}}]
ask = {"role": "user", "content": "What's the weather in Paris?"}
first = client.chat.completions.create(model="claude", messages=[ask], tools=tools)
assert first.choices[0].finish_reason == "tool_calls", first
call = first.choices[0].message.tool_calls[0]
assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}, call
second = client.chat.completions.create(model="claude", tools=tools, messages=[
    ask,
    first.choices[0].message.model_dump(exclude_none=True),
    {"role": "tool", "tool_call_id": call.id, "content": "18C and sunny"},
])
assert second.choices[0].finish_reason == "stop" and second.choices[0].message.content, second

# The same call, streamed: arguments arrive in pieces under one index.
arguments, name = "", None
for chunk in client.chat.completions.create(model="claude", messages=[ask], tools=tools, stream=True):
    for piece in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
        assert piece.index == 0, piece
        name = (piece.function.name if piece.function else None) or name
        arguments += (piece.function.arguments or "") if piece.function else ""
assert name == "get_weather" and json.loads(arguments) == {"city": "Paris"}, (name, arguments)

# response_format json_schema, served through a forced tool.
schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
structured = client.chat.completions.create(
    model="claude", messages=[{"role": "user", "content": "The weather as JSON, please."}],
    response_format={"type": "json_schema", "json_schema": {"name": "weather", "schema": schema}},
)
assert structured.choices[0].finish_reason == "stop", structured
assert isinstance(json.loads(structured.choices[0].message.content), dict), structured

# What Anthropic cannot do is a clear 400 naming the parameter.
try:
    client.chat.completions.create(model="claude", messages=messages, n=2)
    raise AssertionError("expected BadRequestError")
except openai.BadRequestError as e:
    assert e.status_code == 400 and e.code == "unsupported_parameter" and e.param == "n", e.body

print("openai chat sdk over an Anthropic upstream: all checks passed")

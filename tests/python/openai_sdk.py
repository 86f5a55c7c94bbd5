"""The official openai SDK against llm-proxy: run by tests/tests/sdk.rs.

usage: python openai_sdk.py BASE_URL   (e.g. http://127.0.0.1:8080/v1)
Exits non-zero with a traceback on the first failed check.
"""
import sys

import openai
from openai import OpenAI

base_url = sys.argv[1]
client = OpenAI(base_url=base_url, api_key="sk-client-key", max_retries=0, timeout=10)
messages = [{"role": "user", "content": "Hello from the SDK"}]

# Non-streamed chat.
chat = client.chat.completions.create(model="demo", messages=messages)
assert chat.object == "chat.completion", chat
assert chat.choices[0].message.content, chat
assert chat.usage.total_tokens > 0, chat

# Streamed chat, with usage.
stream = client.chat.completions.create(
    model="demo", messages=messages, stream=True, stream_options={"include_usage": True}
)
text, usage = "", None
for chunk in stream:
    if chunk.choices:
        text += chunk.choices[0].delta.content or ""
    if chunk.usage:
        usage = chunk.usage
assert text == chat.choices[0].message.content, (text, chat.choices[0].message.content)
assert usage is not None and usage.completion_tokens == chat.usage.completion_tokens, usage

# Completions and embeddings.
completion = client.completions.create(model="demo", prompt="Once upon a time")
assert completion.choices[0].text, completion
emb = client.embeddings.create(model="demo", input=["a", "b"])
assert len(emb.data) == 2 and len(emb.data[0].embedding) > 0, emb

# Models.
models = [m.id for m in client.models.list()]
assert "demo" in models, models

# Errors map to the SDK's exception classes.
try:
    client.chat.completions.create(model="no-such-model", messages=messages)
    raise AssertionError("expected NotFoundError")
except openai.NotFoundError as e:
    assert e.status_code == 404
    assert e.code == "model_not_found", e.body

try:
    client.chat.completions.create(model="demo", messages=messages, extra_headers={"x-mock-fail": "hang"}, timeout=5)
    raise AssertionError("expected a gateway timeout")
except openai.InternalServerError as e:
    assert e.status_code == 504, e
    assert e.code == "upstream_timeout", e.body

print("openai sdk: all checks passed")

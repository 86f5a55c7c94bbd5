"""The official openai SDK's Responses client against llm-proxy: run by
tests/tests/sdk.rs.

usage: python openai_responses.py BASE_URL   (e.g. http://127.0.0.1:8080/v1)
"""
import sys

import openai
from openai import OpenAI

client = OpenAI(base_url=sys.argv[1], api_key="sk-ok", max_retries=0, timeout=10)

first = client.responses.create(model="gpt-ok", input="Hello from the Responses client")
assert first.status == "completed" and first.output_text, first
assert first.usage.input_tokens > 0 and first.usage.output_tokens > 0, first.usage

# A follow-up goes to the upstream that holds the first response.
second = client.responses.create(model="gpt-ok", input="And then?", previous_response_id=first.id)
assert second.status == "completed", second
again = client.responses.retrieve(first.id)
assert again.id == first.id, again

# Streamed.
with client.responses.stream(model="gpt-ok", input="Stream it") as stream:
    deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
    final = stream.get_final_response()
assert "".join(deltas) == final.output_text and final.usage.output_tokens > 0, final

events = [e.type for e in client.responses.create(model="gpt-ok", input="raw", stream=True)]
assert events[0] == "response.created" and events[-1] == "response.completed", events

try:
    client.responses.create(model="gpt-ok", input="x", previous_response_id="resp_unknown")
    raise AssertionError("expected NotFoundError")
except openai.NotFoundError as e:
    assert e.code == "response_not_found", e.body

# Conversations: made through the proxy, each turn goes to the upstream
# that holds it (round robin would send every other one elsewhere).
conversation = client.conversations.create(metadata={"topic": "sdk"})
assert conversation.id.startswith("conv_"), conversation
for n in range(4):
    turn = client.responses.create(model="gpt-ok", input=f"turn {n}", conversation=conversation.id)
    assert turn.status == "completed", turn
assert client.conversations.retrieve(conversation.id).id == conversation.id
items = client.conversations.items.list(conversation.id)
assert items.data == [], items
assert client.conversations.delete(conversation.id).deleted

# A model id with a slash, as the SDK escapes it, is a route (the upstream
# answers for it).
try:
    client.models.retrieve("meta-llama/Llama-3.1-8B-Instruct")
except openai.NotFoundError as e:
    assert "does not exist" in str(e.body), e.body

print("openai responses sdk: all checks passed")

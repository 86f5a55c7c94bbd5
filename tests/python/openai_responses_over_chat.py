"""The openai SDK's responses client against llm-proxy in front of a
chat-only upstream, so every request is translated (Responses -> chat
completions and back, statelessly). Run by tests/tests/translate_e2e.rs.

usage: python openai_responses_over_chat.py BASE_URL   (e.g. http://127.0.0.1:8080/v1)
Exits non-zero with a traceback on the first failed check.
"""
import json
import sys

import openai
from openai import OpenAI

base_url = sys.argv[1]
client = OpenAI(base_url=base_url, api_key="sk-client-key", max_retries=0, timeout=10)

# Non-streamed (no `store` sent: the API's default is accepted, nothing is stored).
resp = client.responses.create(model="demo", instructions="Be brief.", input="Hello from the SDK")
assert resp.object == "response" and resp.status == "completed", resp
assert resp.output_text, resp
assert resp.usage.input_tokens > 0 and resp.usage.output_tokens > 0, resp.usage
assert resp.usage.total_tokens == resp.usage.input_tokens + resp.usage.output_tokens, resp.usage

# Streamed, through the SDK's own accumulator.
with client.responses.stream(model="demo", instructions="Be brief.", input="Hello from the SDK") as stream:
    deltas = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
    final = stream.get_final_response()
assert deltas == resp.output_text and final.output_text == resp.output_text, (deltas, final.output_text)
assert final.usage.output_tokens == resp.usage.output_tokens, final.usage

# Raw events: created first, completed last, sequence numbers in order.
events = list(client.responses.create(model="demo", input="Hello from the SDK", stream=True, store=False))
assert events[0].type == "response.created" and events[-1].type == "response.completed", [e.type for e in events]
assert [e.sequence_number for e in events] == list(range(len(events))), events

# max_output_tokens caps the answer.
capped = client.responses.create(model="demo", input="Hello from the SDK", max_output_tokens=3)
assert capped.status == "incomplete" and capped.incomplete_details.reason == "max_output_tokens", capped

# A function call round trip, the conversation sent whole each time.
tools = [{
    "type": "function",
    "name": "get_weather",
    "description": "The weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}]
ask = {"role": "user", "content": "What's the weather in Paris?"}
first = client.responses.create(model="demo", input=[ask], tools=tools, store=False)
call = next(item for item in first.output if item.type == "function_call")
assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}, call
second = client.responses.create(model="demo", tools=tools, store=False, input=[
    ask,
    {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
    {"type": "function_call_output", "call_id": call.call_id, "output": "18C and sunny"},
])
assert second.status == "completed" and second.output_text, second

# The same call, streamed.
with client.responses.stream(model="demo", input=[ask], tools=tools) as stream:
    final = stream.get_final_response()
call = next(item for item in final.output if item.type == "function_call")
assert json.loads(call.arguments) == {"city": "Paris"}, call

# A translated answer is kept nowhere, and its id is not recorded: the
# proxy does not know it.
try:
    client.responses.create(model="demo", input="Hello", previous_response_id=resp.id)
    raise AssertionError("expected NotFoundError for a translated answer's id")
except openai.NotFoundError as e:
    assert e.code == "response_not_found", e.body

# What needs server state is a clear 400 naming the field.
for extra in ({"store": True}, {"background": True}):
    try:
        client.responses.create(model="demo", input="Hello", **extra)
        raise AssertionError(f"expected BadRequestError for {extra}")
    except openai.BadRequestError as e:
        assert e.status_code == 400 and e.param == next(iter(extra)), (extra, e.body)
try:
    client.responses.create(model="demo", input="Hello", tools=[{"type": "code_interpreter", "container": {"type": "auto"}}])
    raise AssertionError("expected BadRequestError for a built-in tool")
except openai.BadRequestError as e:
    assert e.param == "tools[0]", e.body

# Codex's tools: web search (left out: a chat server cannot search) and
# functions in a namespace, called as the client names them.
codex_tools = [
    {"type": "web_search", "external_web_access": True},
    {"type": "namespace", "name": "weather_v1", "description": "Weather tools", "tools": tools},
]
first = client.responses.create(model="demo", input=[ask], tools=codex_tools, store=False)
call = next(item for item in first.output if item.type == "function_call")
assert (call.name, call.namespace) == ("get_weather", "weather_v1"), call
second = client.responses.create(model="demo", tools=codex_tools, store=False, input=[
    ask,
    {"type": "function_call", "call_id": call.call_id, "name": call.name,
     "namespace": call.namespace, "arguments": call.arguments},
    {"type": "function_call_output", "call_id": call.call_id, "output": "18C and sunny"},
])
assert second.status == "completed" and second.output_text, second
with client.responses.stream(model="demo", input=[ask], tools=codex_tools) as stream:
    streamed = list(stream)
added = next(e for e in streamed if e.type == "response.output_item.added" and e.item.type == "function_call")
assert (added.item.name, added.item.namespace) == ("get_weather", "weather_v1"), added
done = next(e for e in streamed if e.type == "response.function_call_arguments.done")
assert done.name == "get_weather", done
final = stream.get_final_response()
call = next(item for item in final.output if item.type == "function_call")
assert (call.name, call.namespace) == ("get_weather", "weather_v1"), call

print("openai responses sdk over a chat-only upstream: all checks passed")

"""The official openai and anthropic SDKs against the mock itself: run by
crates/mock/tests/sdk.rs, which serves a mock and passes its root URL.

usage: python sdk_shapes.py ROOT_URL   (e.g. http://127.0.0.1:9001)
Exits non-zero with a traceback on the first failed check.
"""
import json
import sys

import anthropic
import openai

root = sys.argv[1].rstrip("/")
oa = openai.OpenAI(base_url=root + "/v1", api_key="sk-test", max_retries=0, timeout=10)
an = anthropic.Anthropic(base_url=root, api_key="sk-ant-test", max_retries=0, timeout=10)



def strict(obj):
    """`obj`, after checking that its JSON validates against its SDK type
    strictly: the SDKs build responses leniently, and would not notice a
    missing required field or a wrong type."""
    type(obj).model_validate(obj.to_dict(mode="json"))
    return obj


WEATHER_TOOL_OPENAI_CHAT = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
WEATHER_TOOL_RESPONSES = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}
WEATHER_TOOL_ANTHROPIC = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}


def check_responses():
    # Whole.
    r = strict(oa.responses.create(model="gpt-test", input="Hello from the SDK"))
    assert r.object == "response", r
    assert r.id.startswith("resp_"), r.id
    assert r.status == "completed", r
    assert r.model == "gpt-test", r
    assert r.output[0].type == "message", r.output
    assert r.output[0].content[0].type == "output_text", r.output
    text = r.output_text
    assert len(text.split(" ")) == 8, text
    assert r.usage.output_tokens == 8, r.usage
    assert r.usage.total_tokens == r.usage.input_tokens + 8, r.usage
    assert r.usage.input_tokens_details.cached_tokens == 0, r.usage
    assert r.usage.output_tokens_details.reasoning_tokens == 0, r.usage
    assert r.store is True and r.previous_response_id is None, r

    # Remembered: retrieve, chain, input items, cancel, delete.
    assert oa.responses.retrieve(r.id).id == r.id
    follow = oa.responses.create(model="gpt-test", input="And then?", previous_response_id=r.id)
    assert follow.previous_response_id == r.id and follow.id != r.id, follow
    items = oa.responses.input_items.list(r.id)
    assert list(items) == [], items
    assert oa.responses.cancel(follow.id).status == "cancelled"
    oa.responses.delete(follow.id)
    for call in (
        lambda: oa.responses.retrieve(follow.id),
        lambda: oa.responses.create(model="gpt-test", input="x", previous_response_id="resp_nope"),
    ):
        try:
            call()
            raise AssertionError("expected NotFoundError")
        except openai.NotFoundError as e:
            assert e.status_code == 404, e
    try:
        oa.responses.create(model="gpt-test", input="x", previous_response_id="resp_nope")
        raise AssertionError("expected NotFoundError")
    except openai.NotFoundError as e:
        assert e.code == "previous_response_not_found", e.body
        assert e.param == "previous_response_id", e.body

    # Capped.
    capped = strict(oa.responses.create(model="gpt-test", input="Hello from the SDK", max_output_tokens=2))
    assert capped.status == "incomplete", capped
    assert capped.incomplete_details.reason == "max_output_tokens", capped
    assert capped.usage.output_tokens == 2, capped.usage

    # Streamed, raw events.
    types, deltas, final = [], "", None
    for event in oa.responses.create(model="gpt-test", input="Hello from the SDK", stream=True):
        strict(event)
        types.append(event.type)
        if event.type == "response.output_text.delta":
            deltas += event.delta
        if event.type == "response.completed":
            final = event.response
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ], types
    assert types[4:12] == ["response.output_text.delta"] * 8, types
    assert types[12:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ], types
    assert deltas == text, (deltas, text)
    assert final.output_text == text and final.usage.output_tokens == 8, final

    # Streamed, with the helper.
    with oa.responses.stream(model="gpt-test", input="Hello from the SDK") as stream:
        helper_text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert helper_text == text and final.output_text == text, final
    assert final.usage.total_tokens == final.usage.input_tokens + 8, final.usage

    # A function call, whole and streamed.
    call = strict(
        oa.responses.create(model="gpt-test", input="What's the weather in Paris?", tools=[WEATHER_TOOL_RESPONSES])
    )
    for event in oa.responses.create(
        model="gpt-test", input="What's the weather in Paris?", tools=[WEATHER_TOOL_RESPONSES], stream=True
    ):
        strict(event)
    fc = call.output[0]
    assert fc.type == "function_call" and fc.name == "get_weather", call.output
    assert json.loads(fc.arguments) == {"city": "Paris"}, fc
    with oa.responses.stream(
        model="gpt-test", input="What's the weather in Paris?", tools=[WEATHER_TOOL_RESPONSES]
    ) as stream:
        for _ in stream:
            pass
        final = stream.get_final_response()
    assert json.loads(final.output[0].arguments) == {"city": "Paris"}, final.output
    answer = oa.responses.create(
        model="gpt-test",
        previous_response_id=call.id,
        tools=[WEATHER_TOOL_RESPONSES],
        input=[{"type": "function_call_output", "call_id": fc.call_id, "output": "sunny"}],
    )
    assert answer.output[0].type == "message" and answer.output_text, answer

    # Token counting and compaction.
    count = strict(oa.responses.input_tokens.count(model="gpt-test", input="Hello from the SDK"))
    assert count.object == "response.input_tokens" and count.input_tokens > 0, count
    compacted = strict(oa.responses.compact(model="gpt-test", input="Hello from the SDK"))
    assert compacted.object == "response.compaction", compacted
    assert compacted.output[0].type == "compaction", compacted


def check_chat_tools():
    messages = [{"role": "user", "content": "What's the weather in Paris?"}]
    chat = strict(oa.chat.completions.create(model="gpt-test", messages=messages, tools=[WEATHER_TOOL_OPENAI_CHAT]))
    choice = chat.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    call = choice.message.tool_calls[0]
    assert call.id.startswith("call_") and call.function.name == "get_weather", call
    assert json.loads(call.function.arguments) == {"city": "Paris"}, call
    arguments, finish = "", None
    for chunk in oa.chat.completions.create(
        model="gpt-test", messages=messages, tools=[WEATHER_TOOL_OPENAI_CHAT], stream=True
    ):
        delta = strict(chunk).choices[0].delta
        for tc in delta.tool_calls or []:
            arguments += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert json.loads(arguments) == {"city": "Paris"} and finish == "tool_calls", (arguments, finish)
    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
    ]
    answer = oa.chat.completions.create(model="gpt-test", messages=messages, tools=[WEATHER_TOOL_OPENAI_CHAT])
    assert answer.choices[0].finish_reason == "stop" and answer.choices[0].message.content, answer


def check_messages():
    messages = [{"role": "user", "content": "Hello from the SDK"}]
    m = strict(an.messages.create(model="claude-test", max_tokens=100, messages=messages))
    assert m.type == "message" and m.role == "assistant", m
    assert m.id.startswith("msg_") and m.model == "claude-test", m
    assert m.stop_reason == "end_turn" and m.stop_sequence is None, m
    text = m.content[0].text
    assert m.content[0].type == "text" and len(text.split(" ")) == 8, m
    assert m.usage.output_tokens == 8 and m.usage.input_tokens > 0, m.usage

    capped = an.messages.create(model="claude-test", max_tokens=3, messages=messages)
    assert capped.stop_reason == "max_tokens" and capped.usage.output_tokens == 3, capped

    # Streamed, raw events.
    types, deltas = [], ""
    for event in an.messages.create(model="claude-test", max_tokens=100, messages=messages, stream=True):
        strict(event)
        types.append(event.type)
        if event.type == "content_block_delta":
            deltas += event.delta.text
        if event.type == "message_delta":
            assert event.delta.stop_reason == "end_turn" and event.usage.output_tokens == 8, event
    # The SDK drops `ping`.
    assert types == ["message_start", "content_block_start"] + ["content_block_delta"] * 8 + [
        "content_block_stop",
        "message_delta",
        "message_stop",
    ], types
    assert deltas == text, (deltas, text)

    # Streamed, with the helper.
    with an.messages.stream(model="claude-test", max_tokens=100, messages=messages) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == text and final.content[0].text == text, final
    assert final.usage.output_tokens == 8 and final.stop_reason == "end_turn", final

    count = strict(an.messages.count_tokens(model="claude-test", messages=messages))
    assert count.input_tokens > 0, count

    # A tool round trip, whole and streamed.
    ask = [{"role": "user", "content": "What's the weather in Paris?"}]
    use = strict(an.messages.create(model="claude-test", max_tokens=100, messages=ask, tools=[WEATHER_TOOL_ANTHROPIC]))
    for event in an.messages.create(
        model="claude-test", max_tokens=100, messages=ask, tools=[WEATHER_TOOL_ANTHROPIC], stream=True
    ):
        strict(event)
    assert use.stop_reason == "tool_use", use
    block = use.content[0]
    assert block.type == "tool_use" and block.name == "get_weather", block
    assert block.id.startswith("toolu_") and block.input == {"city": "Paris"}, block
    with an.messages.stream(
        model="claude-test", max_tokens=100, messages=ask, tools=[WEATHER_TOOL_ANTHROPIC]
    ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use" and final.content[0].input == {"city": "Paris"}, final
    reply = an.messages.create(
        model="claude-test",
        max_tokens=100,
        tools=[WEATHER_TOOL_ANTHROPIC],
        messages=ask
        + [
            {"role": "assistant", "content": [b.model_dump() for b in use.content]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": block.id, "content": "sunny"}]},
        ],
    )
    assert reply.stop_reason == "end_turn" and reply.content[0].type == "text", reply

    # Errors map to the SDK's exception classes.
    for status, error_class, kind in [
        ("529", anthropic.OverloadedError, "overloaded_error"),
        ("429", anthropic.RateLimitError, "rate_limit_error"),
        ("500", anthropic.InternalServerError, "api_error"),
    ]:
        try:
            an.messages.create(
                model="claude-test", max_tokens=10, messages=messages, extra_headers={"x-mock-fail": status}
            )
            raise AssertionError(f"expected {error_class.__name__}")
        except error_class as e:
            assert e.body["type"] == "error" and e.body["error"]["type"] == kind, e.body


check_responses()
check_chat_tools()
check_messages()
print("sdk shapes: all checks passed")

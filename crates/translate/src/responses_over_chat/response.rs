//! A whole chat completion as a Responses `response` object.

use serde_json::{Value, json};

use super::{Context, ResponseObject, TextPart, call_id, name_call, status};
use crate::chat::Usage;
use crate::content::Message;
use crate::wire::{model_or, now_secs, restyle_id, str_of};

/// The id of output item `index` of response `bare` (the upstream's id
/// without its prefix).
pub(crate) fn item_id(prefix: &str, bare: &str, index: usize) -> String {
    match index {
        0 => format!("{prefix}_{bare}"),
        i => format!("{prefix}_{bare}_{i}"),
    }
}

/// Translate a `chat.completion` into a `response`. `Err` names what is
/// missing when the upstream's answer is not a chat completion.
pub(crate) fn response(chat: &Value, ctx: &Context) -> Result<Value, String> {
    if let Some(error) = crate::chat::answer_error(chat) {
        return Err(error);
    }
    let choice = chat
        .get("choices")
        .and_then(Value::as_array)
        .and_then(|c| c.first())
        .ok_or("the upstream's chat completion has no choices")?;
    if let Some(why) = str_of(choice, "finish_reason").and_then(crate::chat::failed_finish) {
        return Err(why);
    }
    let message = choice.get("message").unwrap_or(&Value::Null);
    let id = restyle_id("resp_", str_of(chat, "id"));
    let bare = id.trim_start_matches("resp_");
    let (status, incomplete) = status(str_of(choice, "finish_reason"));
    let mut output = Vec::new();
    let read = Message::read(message);
    let (text, refusal) = (read.text(), read.refusal());
    let calls = read.calls()?;
    // Cut by the limit, the last item is: a message that calls follow was
    // finished whole, as the stream says of it.
    let cut = status != "completed" && calls.is_empty();
    if text.is_some() || refusal.is_some() {
        let mut parts = Vec::new();
        parts.extend(text.map(|text| json!(TextPart::new(text))));
        parts.extend(refusal.map(|r| json!({"type": "refusal", "refusal": r})));
        output.push(json!({
            "type": "message",
            "id": item_id("msg", bare, output.len()),
            "status": if cut { "incomplete" } else { "completed" },
            "role": "assistant",
            "content": parts,
        }));
    }
    let mut ids: Vec<String> = Vec::with_capacity(calls.len());
    for (i, call) in calls.iter().enumerate() {
        let function = call.function;
        let id = call_id(call.id, |id| ids.iter().any(|given| given == id));
        ids.push(id.clone());
        let index = output.len();
        // The last call is the item a limit cut, as the stream says.
        let cut_here = status != "completed" && i + 1 == calls.len();
        let mut item = json!({
            "type": "function_call",
            "id": item_id("fc", bare, index),
            "call_id": id,
            "arguments": crate::wire::arguments_text(function)
                .filter(|a| !a.is_empty())
                .unwrap_or("{}".into()),
            "status": if cut_here { "incomplete" } else { "completed" },
        });
        name_call(&mut item, ctx, str_of(function, "name").unwrap_or_default());
        output.push(item);
    }
    let usage = Usage::from_value(chat.get("usage"));
    let created_at = chat
        .get("created")
        .and_then(Value::as_u64)
        .unwrap_or_else(now_secs);
    let object = ResponseObject {
        ctx,
        id: &id,
        created_at,
        model: model_or(str_of(chat, "model"), &ctx.model),
        status,
        incomplete,
        output,
        usage: usage.as_ref().map(Into::into),
    };
    Ok(json!(object))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_and_function_calls() {
        let chat = json!({
            "id": "chatcmpl-9", "created": 5, "model": "m",
            "choices": [{"finish_reason": "tool_calls", "message": {"role": "assistant", "content": "On it.",
                "tool_calls": [
                    {"id": "call_a", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                    {"id": "call_b", "type": "function", "function": {"name": "g", "arguments": "{\"x\":1}"}}]}}],
            "usage": {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10},
        });
        let out = response(&chat, &Context::default()).unwrap();
        assert_eq!(out["id"], "resp_9");
        assert_eq!(out["object"], "response");
        assert_eq!(out["status"], "completed");
        assert_eq!(out["output"][0]["id"], "msg_9");
        assert_eq!(out["output"][0]["content"][0]["text"], "On it.");
        assert_eq!(out["output"][2]["call_id"], "call_b");
        assert_eq!(out["output"][2]["id"], "fc_9_2");
        assert_eq!(out["usage"]["total_tokens"], 10);
    }

    #[test]
    fn no_usage_is_null() {
        for (usage, chat) in crate::test_util::chat_answers_without_usage() {
            let out = response(&chat, &Context::default()).unwrap();
            assert_eq!(out["usage"], Value::Null, "{usage:?}");
            // What the auth layer reads: no usage, so the reservation stands.
            assert_eq!(llm_proxy_core::usage::from_value(&out), None, "{usage:?}");
        }
    }

    #[test]
    fn arguments_sent_as_an_object_are_kept() {
        let chat = json!({"choices": [{"finish_reason": "tool_calls", "message": {
            "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "f", "arguments": {"city": "Paris"}}}]}}]});
        let out = response(&chat, &Context::default()).unwrap();
        let call = out["output"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["type"] == "function_call")
            .unwrap()
            .clone();
        assert_eq!(call["arguments"], r#"{"city":"Paris"}"#);
    }

    /// Cut by the limit after a message and a call, the call is the item
    /// cut: the message was finished whole, as the stream of the same
    /// answer says (`only_the_item_cut_by_the_limit_is_incomplete`).
    #[test]
    fn a_message_followed_by_calls_is_not_the_item_cut() {
        let call = json!([{"id": "a", "type": "function",
            "function": {"name": "f", "arguments": "{\"q\":"}}]);
        for (calls, message) in [(Some(call), "completed"), (None, "incomplete")] {
            let mut message_json = json!({"role": "assistant", "content": "Let me check."});
            let with_calls = calls.is_some();
            if let Some(calls) = calls {
                message_json["tool_calls"] = calls;
            }
            let chat = json!({"id": "chatcmpl-5", "choices": [{"finish_reason": "length",
                "message": message_json}]});
            let out = response(&chat, &Context::default()).unwrap();
            assert_eq!(out["status"], "incomplete");
            assert_eq!(out["output"][0]["status"], message, "{out}");
            if with_calls {
                // Its arguments are not whole JSON: not a call to run.
                assert_eq!(out["output"][1]["status"], "incomplete", "{out}");
            }
        }
    }

    #[test]
    fn calls_without_arguments_have_an_empty_object() {
        let chat = json!({"id": "chatcmpl-4", "choices": [{"finish_reason": "tool_calls", "message": {
            "tool_calls": [
                {"id": "a", "type": "function", "function": {"name": "f", "arguments": ""}},
                {"id": "b", "type": "function", "function": {"name": "g"}}]}}]});
        let out = response(&chat, &Context::default()).unwrap();
        assert_eq!(out["output"][0]["arguments"], "{}");
        assert_eq!(out["output"][1]["arguments"], "{}");
    }

    #[test]
    fn function_calls_without_ids_get_distinct_call_ids() {
        let chat = json!({"id": "chatcmpl-3", "choices": [{"finish_reason": "tool_calls", "message": {
            "tool_calls": [
                {"type": "function", "function": {"name": "f", "arguments": "{}"}},
                {"id": "", "type": "function", "function": {"name": "g", "arguments": "{}"}},
                {"id": "call_9", "type": "function", "function": {"name": "h", "arguments": "{}"}},
                {"id": "call_9", "type": "function", "function": {"name": "i", "arguments": "{}"}}]}}]});
        let out = response(&chat, &Context::default()).unwrap();
        let made_up =
            |out: &Value, i: usize| out["output"][i]["call_id"].as_str().unwrap().to_owned();
        // An id an earlier call of the answer has is not given again.
        assert_eq!(made_up(&out, 2), "call_9");
        let d = made_up(&out, 3);
        assert!(d.starts_with("call_") && d != "call_9", "{d}");
        let (a, b) = (made_up(&out, 0), made_up(&out, 1));
        assert!(
            a.starts_with("call_") && b.starts_with("call_") && a != b,
            "{a} {b}"
        );
        assert_eq!(out["output"][1]["id"], "fc_3_1");
        // Nor is one reused by a later answer: the client sends every
        // turn's calls back, and pairs outputs to calls by `call_id`.
        let again = response(&chat, &Context::default()).unwrap();
        assert!(![a, b].contains(&made_up(&again, 0)), "{again}");
    }

    #[test]
    fn empty_or_missing_ids_and_models_are_not_used() {
        let ctx = Context {
            model: "gpt-x".into(),
            ..Context::default()
        };
        for id in [Some(""), None] {
            let mut chat = json!({"model": "", "choices": [{"finish_reason": "tool_calls", "message": {
                "content": "a", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]}}]});
            if let Some(id) = id {
                chat["id"] = json!(id);
            }
            let first = response(&chat, &ctx).unwrap();
            let second = response(&chat, &ctx).unwrap();
            assert_eq!(first["model"], "gpt-x", "{id:?}");
            let made = first["id"].as_str().unwrap();
            let bare = made.strip_prefix("resp_").unwrap();
            assert!(bare.len() > 8, "{made}");
            assert_eq!(first["output"][0]["id"], format!("msg_{bare}"));
            assert_eq!(first["output"][1]["id"], format!("fc_{bare}_1"));
            assert_ne!(first["id"], second["id"], "a fresh id for each answer");
        }
    }

    #[test]
    fn length_is_incomplete() {
        let chat = json!({"choices": [{"finish_reason": "length", "message": {"content": "cut"}}]});
        let out = response(&chat, &Context::default()).unwrap();
        assert_eq!(out["status"], "incomplete");
        assert_eq!(out["incomplete_details"]["reason"], "max_output_tokens");
        assert_eq!(out["output"][0]["status"], "incomplete");
    }

    #[test]
    fn an_answer_the_upstream_gave_up_on_is_no_response() {
        for (chat, why) in crate::test_util::answers_given_up() {
            assert_eq!(response(&chat, &Context::default()), Err(why));
        }
        // A whole answer without a reason came whole: finished.
        let chat = json!({"choices": [{"message": {"content": "a"}}]});
        let out = response(&chat, &Context::default()).unwrap();
        assert_eq!(out["status"], "completed");
    }

    #[test]
    fn calls_that_are_not_objects_are_none_and_too_many_are_refused() {
        let ctx = Context::default();
        let answer = |calls: Vec<Value>| {
            json!({"id": "chatcmpl-9", "choices": [{"finish_reason": "tool_calls", "message": {
                "tool_calls": calls}}]})
        };
        let one = json!({"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}});
        let out = response(&answer(vec![json!(0), one.clone(), json!("x")]), &ctx).unwrap();
        assert_eq!(out["output"].as_array().unwrap().len(), 1, "{out}");
        assert_eq!(out["output"][0]["call_id"], "call_1");
        let many = vec![json!(0); crate::stream::MAX_BLOCKS + 1];
        let refused = response(&answer(many), &ctx).unwrap_err();
        assert!(refused.contains("tool calls"), "{refused}");
    }
}

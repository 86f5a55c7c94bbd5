//! A whole chat completion as a Messages `message`.

use serde_json::{Value, json};

use super::{Context, stop_reason, tool_use_id};
use crate::chat::Usage;
use crate::content::Message;
use crate::wire::{arguments_to_input, model_or, restyle_id, str_of};

/// Translate a `chat.completion` into an Anthropic `message`. `Err` names
/// what is missing when the upstream's answer is not a chat completion.
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
    let read = Message::read(message);
    let mut content = Vec::new();
    if let Some(thinking) = read.reasoning().filter(|_| ctx.thinking) {
        content.push(json!({"type": "thinking", "thinking": thinking, "signature": ""}));
    }
    for text in [read.text(), read.refusal()].into_iter().flatten() {
        content.push(json!({"type": "text", "text": text}));
    }
    let calls = read.calls()?;
    let mut ids: Vec<String> = Vec::with_capacity(calls.len());
    for call in &calls {
        let function = call.function;
        let id = tool_use_id(call.id, |id| ids.iter().any(|given| given == id));
        ids.push(id.clone());
        content.push(json!({
            "type": "tool_use",
            "id": id,
            "name": str_of(function, "name").unwrap_or_default(),
            "input": arguments_to_input(&crate::wire::arguments_text(function).unwrap_or_default()),
        }));
    }
    let (reason, sequence) = stop_reason(
        str_of(choice, "finish_reason"),
        choice.get("stop_reason"),
        !calls.is_empty(),
        ctx,
    );
    // Anthropic's `usage` is required; when the upstream reported none its
    // counts are null, which no reader takes for a real (zero) usage: the
    // auth layer then keeps the token reservation, as for a native answer.
    let usage = match Usage::from_value(chat.get("usage")) {
        Some(u) => json!({"input_tokens": u.input(), "output_tokens": u.output()}),
        None => json!({"input_tokens": null, "output_tokens": null}),
    };
    Ok(json!({
        "id": restyle_id("msg_", str_of(chat, "id")),
        "type": "message",
        "role": "assistant",
        "model": model_or(str_of(chat, "model"), &ctx.model),
        "content": content,
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": usage,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_tool_calls() {
        let chat = json!({
            "id": "chatcmpl-1", "model": "m",
            "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": "Let me check.",
                "reasoning_content": "hidden",
                "tool_calls": [{"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14},
        });
        let out = response(&chat, &Context::default()).unwrap();
        assert_eq!(out["id"], "msg_1");
        assert_eq!(
            out["content"][0],
            json!({"type": "text", "text": "Let me check."})
        );
        assert_eq!(out["content"][1]["input"], json!({"city": "Paris"}));
        assert_eq!(
            out["content"].as_array().unwrap().len(),
            2,
            "no thinking unless asked"
        );
        assert_eq!(out["stop_reason"], "tool_use");
        assert_eq!(
            out["usage"],
            json!({"input_tokens": 10, "output_tokens": 4})
        );
    }

    #[test]
    fn no_usage_is_not_a_zero_usage() {
        for (usage, chat) in crate::test_util::chat_answers_without_usage() {
            let out = response(&chat, &Context::default()).unwrap();
            assert_eq!(
                out["usage"],
                json!({"input_tokens": null, "output_tokens": null}),
                "{usage:?}"
            );
            // What the auth layer reads: no usage, so the reservation stands.
            assert_eq!(llm_proxy_core::usage::from_value(&out), None, "{usage:?}");
        }
        let chat = json!({"choices": [{"message": {"content": "a"}}],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0}});
        let out = response(&chat, &Context::default()).unwrap();
        assert_eq!(out["usage"], json!({"input_tokens": 0, "output_tokens": 0}));
    }

    #[test]
    fn arguments_sent_as_an_object_are_the_input() {
        let chat = json!({"choices": [{"finish_reason": "tool_calls", "message": {
            "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "f", "arguments": {"city": "Paris"}}}]}}]});
        let out = response(&chat, &Context::default()).unwrap();
        assert_eq!(out["content"][0]["input"], json!({"city": "Paris"}));
    }

    #[test]
    fn tool_calls_without_ids_get_distinct_ids() {
        let chat = json!({"choices": [{"finish_reason": "tool_calls", "message": {"content": "x",
            "tool_calls": [
                {"type": "function", "function": {"name": "f", "arguments": "{}"}},
                {"id": "", "type": "function", "function": {"name": "g", "arguments": "{}"}},
                {"id": "call_9", "type": "function", "function": {"name": "h", "arguments": "{}"}},
                {"id": "call_9", "type": "function", "function": {"name": "i", "arguments": "{}"}}]}}]});
        let out = response(&chat, &Context::default()).unwrap();
        let made_up = |out: &Value, i: usize| out["content"][i]["id"].as_str().unwrap().to_owned();
        let (a, b) = (made_up(&out, 1), made_up(&out, 2));
        assert!(
            a.starts_with("toolu_") && b.starts_with("toolu_") && a != b,
            "{a} {b}"
        );
        assert_eq!(out["content"][3]["id"], "call_9");
        // An id an earlier call of the answer has is not given again.
        let d = made_up(&out, 4);
        assert!(d.starts_with("toolu_") && ![&a, &b].contains(&&d), "{d}");
        // Nor is one reused by a later answer: Anthropic refuses a
        // conversation whose `tool_use` ids repeat ("`tool_use` ids must be
        // unique"), and clients pair results to calls by id alone.
        let again = response(&chat, &Context::default()).unwrap();
        assert!(![a, b].contains(&made_up(&again, 1)), "{again}");
    }

    #[test]
    fn empty_or_missing_ids_and_models_are_not_used() {
        let ctx = Context {
            model: "claude-x".into(),
            ..Context::default()
        };
        for id in [Some(""), None] {
            let mut chat = json!({"model": "", "choices": [{"finish_reason": "stop", "message": {"content": "a"}}]});
            if let Some(id) = id {
                chat["id"] = json!(id);
            }
            let first = response(&chat, &ctx).unwrap();
            let second = response(&chat, &ctx).unwrap();
            assert_eq!(first["model"], "claude-x", "{id:?}");
            let made = first["id"].as_str().unwrap();
            assert!(made.starts_with("msg_") && made.len() > 12, "{made}");
            assert_ne!(first["id"], second["id"], "a fresh id for each answer");
        }
    }

    #[test]
    fn thinking_when_asked_and_missing_choices() {
        let chat = json!({"choices": [{"finish_reason": "length",
            "message": {"content": "a", "reasoning_content": "r"}}]});
        let ctx = Context {
            thinking: true,
            model: "client".into(),
            ..Context::default()
        };
        let out = response(&chat, &ctx).unwrap();
        assert_eq!(out["content"][0]["type"], "thinking");
        assert_eq!(out["stop_reason"], "max_tokens");
        assert_eq!(out["model"], "client");
        assert!(response(&json!({"id": "x"}), &ctx).is_err());
        // An error sent with `200` is told in the upstream's own words.
        for (error, words) in [
            (
                json!({"error": {"message": "overloaded", "code": 502}}),
                "overloaded",
            ),
            (json!({"error": "rate limited"}), "rate limited"),
            (
                json!({"object": "error", "message": "CUDA out of memory", "code": 500}),
                "CUDA out of memory",
            ),
        ] {
            assert_eq!(
                response(&error, &ctx),
                Err(format!("the upstream answered with an error: {words}"))
            );
        }
    }

    #[test]
    fn an_answer_the_upstream_gave_up_on_is_no_message() {
        for (chat, why) in crate::test_util::answers_given_up() {
            assert_eq!(response(&chat, &Context::default()), Err(why));
        }
        // A whole answer without a reason came whole: finished.
        let chat = json!({"choices": [{"message": {"content": "a"}}]});
        let out = response(&chat, &Context::default()).unwrap();
        assert_eq!(out["stop_reason"], "end_turn");
    }
}

//! What a chat answer says, read alike from a whole answer's `message`
//! ([`Message`]) and from a stream's deltas
//! ([`Delta`](crate::chat::Delta)): its text and content in parts, its
//! reasoning under any of the names servers give it, and its tool calls,
//! a legacy `function_call` among them.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::Value;

use crate::chat::is_a_call;
use crate::stream::MAX_BLOCKS;

/// The reasoning of a delta or message: the first non-empty of
/// `reasoning_content` (DeepSeek, vLLM), `reasoning` (newer vLLM, Ollama;
/// vLLM fills both with the same text) and the content's `thinking` parts
/// (Mistral).
pub(crate) fn first_reasoning<const N: usize>(names: [Option<&str>; N]) -> Option<&str> {
    names.into_iter().flatten().find(|t| !t.is_empty())
}

/// A message's or a delta's `content`: a string, or an array of parts, as
/// Mistral's reasoning models send it. `text` parts (and parts without a
/// `type` that have a `text`) are its text; `thinking` parts, whose
/// `thinking` is text parts (or a string), are reasoning, read where
/// `reasoning_content` is; parts of any other type carry nothing a
/// translation can tell, and are left out.
#[derive(Debug, Default)]
pub(crate) struct Content<'a> {
    pub text: Option<Cow<'a, str>>,
    pub thinking: Option<Cow<'a, str>>,
}

impl<'a> Content<'a> {
    /// A whole answer's `content` (a string, or parts; none otherwise).
    pub fn from_value(value: Option<&'a Value>) -> Content<'a> {
        match value {
            Some(Value::String(text)) => Content {
                text: Some(Cow::Borrowed(text)),
                thinking: None,
            },
            Some(Value::Array(parts)) => Content::from_parts(parts),
            _ => Content::default(),
        }
    }

    /// The content of an array of parts, streamed or whole.
    fn from_parts(parts: &[Value]) -> Content<'a> {
        let (mut text, mut thinking) = (String::new(), String::new());
        push_text_parts(&mut text, parts);
        for part in parts {
            if part.get("type").and_then(Value::as_str) == Some("thinking") {
                match part.get("thinking") {
                    Some(Value::String(t)) => thinking.push_str(t),
                    Some(Value::Array(inner)) => push_text_parts(&mut thinking, inner),
                    _ => {}
                }
            }
        }
        let some = |s: String| (!s.is_empty()).then_some(Cow::Owned(s));
        Content {
            text: some(text),
            thinking: some(thinking),
        }
    }
}

/// Append the text of the `text` parts (or untyped parts with a `text`)
/// among `parts`.
fn push_text_parts(out: &mut String, parts: &[Value]) {
    for part in parts {
        let kind = part.get("type").and_then(Value::as_str);
        if let (None | Some("text"), Some(text)) = (kind, part.get("text").and_then(Value::as_str))
        {
            out.push_str(text);
        }
    }
}

/// Deserialize a delta's `content` as [`Content`]: a string borrowed from
/// the chunk when it has no escapes (one per token: the hot path), an
/// array of parts, and none for null or anything else (a content the
/// translation cannot read does not fail the stream, as a whole answer's
/// does not fail it).
pub(crate) fn deserialize<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Content<'de>>, D::Error> {
    use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor, value};

    struct Read;
    impl<'de> Visitor<'de> for Read {
        type Value = Option<Content<'de>>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a string or an array of content parts")
        }
        fn visit_borrowed_str<E>(self, text: &'de str) -> Result<Self::Value, E> {
            Ok(Some(Content {
                text: Some(Cow::Borrowed(text)),
                thinking: None,
            }))
        }
        fn visit_str<E>(self, text: &str) -> Result<Self::Value, E> {
            Ok(Some(Content {
                text: Some(Cow::Owned(text.to_owned())),
                thinking: None,
            }))
        }
        fn visit_string<E>(self, text: String) -> Result<Self::Value, E> {
            Ok(Some(Content {
                text: Some(Cow::Owned(text)),
                thinking: None,
            }))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
            let parts = Vec::<Value>::deserialize(value::SeqAccessDeserializer::new(seq))?;
            Ok(Some(Content::from_parts(&parts)))
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            IgnoredAny::deserialize(value::MapAccessDeserializer::new(map))?;
            Ok(None)
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
            Ok(None)
        }
    }
    d.deserialize_any(Read)
}

/// A whole answer's `message`, read as a stream's deltas are: its text
/// (content in parts too), refusal, reasoning (under any of its names) and
/// tool calls (a legacy `function_call` too).
#[derive(Debug)]
pub(crate) struct Message<'a> {
    message: &'a Value,
    content: Content<'a>,
    refusal: Content<'a>,
    reasoning_content: Option<&'a str>,
    reasoning: Option<&'a str>,
}

impl<'a> Message<'a> {
    /// Read the `message` of a whole answer's choice.
    pub fn read(message: &'a Value) -> Message<'a> {
        let str_of = |key| message.get(key).and_then(Value::as_str);
        Message {
            message,
            content: Content::from_value(message.get("content")),
            refusal: Content::from_value(message.get("refusal")),
            reasoning_content: str_of("reasoning_content"),
            reasoning: str_of("reasoning"),
        }
    }

    /// The message's text, unless empty.
    pub fn text(&self) -> Option<&str> {
        self.content.text.as_deref().filter(|t| !t.is_empty())
    }

    /// The message's refusal, unless empty.
    pub fn refusal(&self) -> Option<&str> {
        self.refusal.text.as_deref().filter(|t| !t.is_empty())
    }

    /// The message's tool calls: its `tool_calls` (those that are
    /// objects), or, without any, a legacy `function_call` as its one call,
    /// without an id, as
    /// [`Delta::legacy_call`](crate::chat::Delta::legacy_call) reads a
    /// delta's. More than [`MAX_BLOCKS`] is not an answer to translate: each
    /// call becomes an item of its own, so a megabyte of `{}` would become
    /// a hundred.
    pub fn calls(&self) -> Result<Vec<Call<'a>>, String> {
        static NONE: Value = Value::Null;
        let calls = self.message.get("tool_calls").and_then(Value::as_array);
        if let Some(calls) = calls.filter(|c| !c.is_empty()) {
            if calls.len() > MAX_BLOCKS {
                return Err(format!(
                    "the upstream's answer has {} tool calls; at most {MAX_BLOCKS} are translated",
                    calls.len()
                ));
            }
            return Ok(calls
                .iter()
                .filter(|call| call.is_object())
                .map(|call| Call {
                    id: call.get("id").and_then(Value::as_str),
                    function: call.get("function").unwrap_or(&NONE),
                })
                .collect());
        }
        let legacy = self.message.get("function_call").filter(|f| {
            let name = f.get("name").and_then(Value::as_str);
            is_a_call(name, crate::wire::arguments_text(f).as_deref())
        });
        Ok(legacy
            .map(|function| Call { id: None, function })
            .into_iter()
            .collect())
    }

    /// The message's reasoning, as
    /// [`Delta::reasoning_text`](crate::chat::Delta::reasoning_text) reads a
    /// delta's.
    pub fn reasoning(&self) -> Option<&str> {
        first_reasoning([
            self.reasoning_content,
            self.reasoning,
            self.content.thinking.as_deref(),
        ])
    }
}

/// A tool call of a whole answer.
#[derive(Debug)]
pub(crate) struct Call<'a> {
    /// The upstream's id, if it gave one.
    pub id: Option<&'a str>,
    /// Its `function`: `name` and `arguments`.
    pub function: &'a Value,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::Delta;

    #[test]
    fn content_is_a_string_or_parts_and_nothing_else_fails_the_chunk() {
        // What a delta with this `content` reads as: its texts and reasoning.
        let read = |content: &str| {
            let chunk = format!(r#"{{"content":{content}}}"#);
            let delta: Delta<'_> = serde_json::from_str(&chunk).unwrap();
            let texts: Vec<String> = delta.texts().map(str::to_owned).collect();
            (texts, delta.reasoning_text().map(str::to_owned))
        };
        let delta: Delta<'_> = serde_json::from_str(r#"{"content":"plain"}"#).unwrap();
        assert!(matches!(
            delta.content.unwrap().text,
            Some(Cow::Borrowed("plain"))
        ));
        assert_eq!(read(r#""a\nb""#), (vec!["a\nb".to_owned()], None));
        let parts = r#"[{"type":"text","text":"a"},{"text":"b"},{"type":"image_url","image_url":{"url":"x"}},
            {"type":"thinking","thinking":[{"type":"text","text":"t"},{"type":"other","text":"no"}]},
            {"type":"thinking","thinking":"u"},{"type":"refusal","text":"no"},"odd",7]"#;
        assert_eq!(read(parts), (vec!["ab".to_owned()], Some("tu".to_owned())));
        for nothing in [
            "null",
            "7",
            "true",
            r#"{"text":"x"}"#,
            "[]",
            r#"[{"type":"x"}]"#,
        ] {
            assert_eq!(read(nothing), (vec![], None), "{nothing}");
        }
        // A whole answer's message reads the same.
        let message: Value = serde_json::from_str(&format!(r#"{{"content":{parts}}}"#)).unwrap();
        let whole = Message::read(&message);
        assert_eq!((whole.text(), whole.reasoning()), (Some("ab"), Some("tu")));
    }
}

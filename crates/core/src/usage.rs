//! Token usage, read from upstream responses.
//!
//! Accepts the OpenAI chat/completions/embeddings `usage` object
//! (`prompt_tokens`, `completion_tokens`, `total_tokens`; embeddings have no
//! `completion_tokens`) and the Responses/Anthropic naming (`input_tokens`,
//! `output_tokens`). Only the `usage` object is deserialised; the rest of the
//! response is skipped without building a [`serde_json::Value`].
//!
//! ```
//! use llm_proxy_core::usage::{self, Usage};
//!
//! let body = br#"{"id":"x","usage":{"prompt_tokens":3,"completion_tokens":5,"total_tokens":8}}"#;
//! assert_eq!(usage::from_json(body), Some(Usage { input_tokens: 3, output_tokens: 5 }));
//! ```

use serde::Deserialize;

/// Tokens consumed by one request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt (input) tokens.
    pub input_tokens: u64,
    /// Completion (output) tokens.
    pub output_tokens: u64,
}

impl Usage {
    /// Input plus output tokens, saturating at `u64::MAX`.
    pub fn total(&self) -> u64 {
        self.input_tokens.saturating_add(self.output_tokens)
    }
}

/// The top level of a response: only `usage` is read, everything else is
/// skipped.
#[derive(Deserialize)]
struct Envelope {
    #[serde(default)]
    usage: Option<UsageFields>,
}

/// Any field that is not a non-negative integer fails the whole
/// deserialisation, so garbage reads as "no usage"; so does a count past
/// [`MAX_TOKENS`].
#[derive(Deserialize)]
struct UsageFields {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
}

/// The most tokens one count of one answer may say: a thousand times the
/// largest context window served today. An upstream's `u64::MAX` (a bug,
/// or a hostile server) is no usage, not a year of a key's token limit
/// overdrawn, nor a counter saturated for good; the answer is then charged
/// its reservation, as one without usage.
pub const MAX_TOKENS: u64 = 1_000_000_000;

/// Whether every count is at most [`MAX_TOKENS`].
fn plausible(counts: &[Option<u64>]) -> bool {
    counts.iter().flatten().all(|n| *n <= MAX_TOKENS)
}

/// Anthropic's input: `input_tokens` counts only the prompt read fresh;
/// what was read from or written to its prompt cache is counted apart.
/// All three are prompt the model processed (OpenAI's `prompt_tokens`
/// includes its cached tokens), so all three are input here.
fn anthropic_input(
    input: Option<u64>,
    cache_read: Option<u64>,
    cache_creation: Option<u64>,
) -> Option<u64> {
    match (input, cache_read, cache_creation) {
        (None, None, None) => None,
        _ => Some(
            input
                .unwrap_or(0)
                .saturating_add(cache_read.unwrap_or(0))
                .saturating_add(cache_creation.unwrap_or(0)),
        ),
    }
}

impl UsageFields {
    fn into_usage(self) -> Option<Usage> {
        let all = [
            self.prompt_tokens,
            self.completion_tokens,
            self.input_tokens,
            self.output_tokens,
            self.cache_read_input_tokens,
            self.cache_creation_input_tokens,
        ];
        if !plausible(&all) {
            return None;
        }
        let input = self.prompt_tokens.or(anthropic_input(
            self.input_tokens,
            self.cache_read_input_tokens,
            self.cache_creation_input_tokens,
        ));
        let output = self.completion_tokens.or(self.output_tokens);
        if input.is_none() && output.is_none() {
            return None;
        }
        Some(Usage {
            input_tokens: input.unwrap_or(0),
            output_tokens: output.unwrap_or(0),
        })
    }
}

/// The usage of a whole (non-streamed) JSON response: its top-level `usage`
/// object. `None` if the body is not a JSON object, or `usage` is missing,
/// null, or not a valid usage object.
pub fn from_json(body: &[u8]) -> Option<Usage> {
    crate::object_from_slice::<Envelope>(body)
        .ok()?
        .usage?
        .into_usage()
}

/// The usage of a JSON response of which only the end is at hand, because
/// the whole was too large to keep: the object of the last `"usage"` key in
/// `tail`, read where it stands. OpenAI, vLLM, llama.cpp and Anthropic write
/// `usage` after the content, so the end of a large answer holds it. An
/// unescaped `"usage"` followed by `:` is a key in valid JSON (a quote
/// inside a string is escaped); a nested one would be read only if no
/// top-level one came after it.
///
/// Bounded, as the tail is the upstream's to fill: the last
/// [`TAIL_TRIES`] keys are tried, each read from at most
/// [`TAIL_VALUE_BYTES`] (a usage object is a few hundred bytes). Unbounded,
/// a megabyte of `"usage":{"x":{` repeated cost minutes of a worker's time
/// (each key's value read to the end of the tail, through nesting that
/// never closes).
pub fn from_json_tail(tail: &[u8]) -> Option<Usage> {
    const KEY: &[u8] = b"\"usage\"";
    let mut end = tail.len();
    let mut tries = 0;
    while let Some(at) = tail[..end].windows(KEY.len()).rposition(|w| w == KEY) {
        end = at;
        let escapes = tail[..at].iter().rev().take_while(|&&b| b == b'\\').count();
        if escapes % 2 == 1 {
            continue;
        }
        let Some(value) = tail[at + KEY.len()..].trim_ascii_start().strip_prefix(b":") else {
            continue;
        };
        if tries == TAIL_TRIES {
            return None;
        }
        tries += 1;
        let value = &value[..value.len().min(TAIL_VALUE_BYTES)];
        // One value, whatever follows it; not a usage object (a `metadata`
        // entry of that name, say): look further back.
        let mut de = serde_json::Deserializer::from_slice(value);
        if let Some(usage) = UsageFields::deserialize(&mut de)
            .ok()
            .and_then(UsageFields::into_usage)
        {
            return Some(usage);
        }
    }
    None
}

/// How many `"usage":` keys [`from_json_tail`] reads, from the last.
pub const TAIL_TRIES: usize = 8;

/// The most of a `"usage":` key's value [`from_json_tail`] reads.
pub const TAIL_VALUE_BYTES: usize = 4096;

/// [`from_json`] on an already parsed response.
pub fn from_value(value: &serde_json::Value) -> Option<Usage> {
    from_usage_value(value.get("usage")?)
}

/// A `usage` object itself (any dialect's fields); `None` when null or not
/// a valid usage object.
pub fn from_usage_value(usage: &serde_json::Value) -> Option<Usage> {
    if usage.is_null() {
        return None;
    }
    UsageFields::deserialize(usage).ok()?.into_usage()
}

/// The usage in one SSE `data:` payload of a streamed response. `Some` only
/// for the chunk that carries a non-null `usage` object (with OpenAI's
/// `stream_options.include_usage`, the last one before `[DONE]`).
pub fn from_sse_data(data: &str) -> Option<Usage> {
    // Most chunks carry no usage: skip them without parsing.
    if !data.contains("\"usage\"") {
        return None;
    }
    from_json(data.as_bytes())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test should panic on unexpected input
mod tests {
    use super::*;
    use serde_json::json;

    fn usage(input_tokens: u64, output_tokens: u64) -> Option<Usage> {
        Some(Usage {
            input_tokens,
            output_tokens,
        })
    }

    /// Checks both the byte and the `Value` entry points.
    fn both(body: &str) -> Option<Usage> {
        let from_bytes = from_json(body.as_bytes());
        if let Ok(value) = serde_json::from_str::<serde_json::Value>(body) {
            assert_eq!(from_value(&value), from_bytes, "{body}");
        }
        from_bytes
    }

    #[test]
    fn chat_completion() {
        let body = r#"{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,
            "message":{"role":"assistant","content":"hi"}}],
            "usage":{"prompt_tokens":12,"completion_tokens":34,"total_tokens":46,
            "prompt_tokens_details":{"cached_tokens":0}}}"#;
        assert_eq!(both(body), usage(12, 34));
        assert_eq!(both(body).map(|u| u.total()), Some(46));
    }

    #[test]
    fn embeddings_have_no_completion_tokens() {
        let body = r#"{"object":"list","data":[],"usage":{"prompt_tokens":8,"total_tokens":8}}"#;
        assert_eq!(both(body), usage(8, 0));
    }

    #[test]
    fn responses_and_anthropic_naming() {
        let body = r#"{"usage":{"input_tokens":5,"output_tokens":7,"total_tokens":12}}"#;
        assert_eq!(both(body), usage(5, 7));
        // Anthropic counts its prompt cache's reads and writes apart from
        // `input_tokens`: they are input too.
        let body = r#"{"type":"message","usage":{"input_tokens":5,"cache_read_input_tokens":2,"cache_creation_input_tokens":3,"output_tokens":1}}"#;
        assert_eq!(both(body), usage(10, 1));
        let body =
            r#"{"usage":{"input_tokens":0,"cache_read_input_tokens":40000,"output_tokens":4}}"#;
        assert_eq!(both(body), usage(40000, 4));
    }

    #[test]
    fn missing_or_null_usage() {
        assert_eq!(both(r#"{"id":"x"}"#), None);
        assert_eq!(both(r#"{"usage":null}"#), None);
        assert_eq!(both(r#"{"usage":{}}"#), None);
        assert_eq!(both(r#"{"usage":{"total_tokens":3}}"#), None);
        assert_eq!(
            both(r#"{"usage":{"prompt_tokens":null,"completion_tokens":2}}"#),
            usage(0, 2)
        );
    }

    #[test]
    fn malformed_usage_is_absent() {
        for body in [
            r#"{"usage":{"prompt_tokens":-1,"completion_tokens":2}}"#,
            r#"{"usage":{"prompt_tokens":1.5,"completion_tokens":2}}"#,
            r#"{"usage":{"prompt_tokens":"3","completion_tokens":2}}"#,
            r#"{"usage":{"prompt_tokens":18446744073709551616}}"#,
            r#"{"usage":[1,2]}"#,
            r#"{"usage":"lots"}"#,
            r#"[{"usage":{"prompt_tokens":1}}]"#,
            // (serde would read the struct's one field from an array)
            r#"[{"prompt_tokens":1,"completion_tokens":2}]"#,
            r#"{"usage":{"prompt_tokens":1}"#,
            "not json",
            "",
        ] {
            assert_eq!(both(body), None, "{body}");
        }
        assert_eq!(from_json(b"\xFF\xFE"), None);
        assert_eq!(from_value(&json!("usage")), None);
    }

    #[test]
    fn sse_chunks() {
        let delta = r#"{"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"hi"}}]}"#;
        assert_eq!(from_sse_data(delta), None);
        let null_usage =
            r#"{"id":"c","choices":[{"index":0,"delta":{"content":"hi"}}],"usage":null}"#;
        assert_eq!(from_sse_data(null_usage), None);
        let last = r#"{"id":"c","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":3,"total_tokens":12}}"#;
        assert_eq!(from_sse_data(last), usage(9, 3));
        assert_eq!(from_sse_data("[DONE]"), None);
        assert_eq!(from_sse_data(r#"{"usage":"#), None);
        // The word in content is not a usage object.
        let mention = r#"{"choices":[{"delta":{"content":"\"usage\""}}]}"#;
        assert_eq!(from_sse_data(mention), None);
    }

    #[test]
    fn usage_from_the_end_of_a_large_answer() {
        let body = r#"{"id":"x","choices":[{"message":{"content":"say \"usage\": {\"prompt_tokens\": 9}"}}],"usage":{"prompt_tokens":12,"completion_tokens":250000,"total_tokens":250012},"system_fingerprint":"fp"}"#;
        // The tail alone, cut anywhere before `usage`.
        for cut in [0, 20, body.find("\"usage\"").unwrap()] {
            assert_eq!(
                from_json_tail(&body.as_bytes()[cut..]),
                usage(12, 250000),
                "{cut}"
            );
        }
        // The mention in content is escaped: not a key.
        let mention = r#"te\"usage\": {\"prompt_tokens\": 9}"}}]}"#;
        assert_eq!(from_json_tail(mention.as_bytes()), None);
        // Anthropic's, with its cache counts.
        let messages = r#"..."stop_reason":"end_turn","usage":{"input_tokens":3,"cache_read_input_tokens":7,"output_tokens":5}}"#;
        assert_eq!(from_json_tail(messages.as_bytes()), usage(10, 5));
        for bad in [
            r#""usage":null}"#,
            r#""usage":{"prompt_tokens":-1}}"#,
            r#""usage""#,
            r#"no usage here"#,
            r#""usage":{"prompt_tokens":3"#,
        ] {
            assert_eq!(from_json_tail(bad.as_bytes()), None, "{bad}");
        }
        // A later key of that name that is no usage object is passed over.
        let later = r#""usage":{"input_tokens":4,"output_tokens":2},"metadata":{"usage":"x"}}"#;
        assert_eq!(from_json_tail(later.as_bytes()), usage(4, 2));
        let later =
            r#""usage":{"input_tokens":4,"output_tokens":2},"metadata":{"usage":{"note":1}}}"#;
        assert_eq!(from_json_tail(later.as_bytes()), usage(4, 2));
    }

    #[test]
    fn a_tail_of_hostile_usage_keys_is_read_within_bounds() {
        let real = r#""usage":{"prompt_tokens":1,"completion_tokens":2}"#;
        // Keys whose values never close, a megabyte of them, after the real
        // one: only the last few are tried, each on a few KiB.
        let decoy = r#","usage":{"p":"","x":{"#;
        let hostile = format!("{real}{}", decoy.repeat((1 << 20) / decoy.len()));
        assert_eq!(from_json_tail(hostile.as_bytes()), None);
        // Within the bound, a later key that is no usage object is passed
        // over, as before; one more and the real one is past the bound.
        let decoys = |n: usize| format!("{real}{}", r#","usage":"x""#.repeat(n));
        assert_eq!(
            from_json_tail(decoys(TAIL_TRIES - 1).as_bytes()),
            usage(1, 2)
        );
        assert_eq!(from_json_tail(decoys(TAIL_TRIES).as_bytes()), None);
        // A usage object past the value bound is not read whole.
        let padded = format!(
            r#""usage":{{"pad":"{}","prompt_tokens":1,"completion_tokens":2}}"#,
            "x".repeat(TAIL_VALUE_BYTES)
        );
        assert_eq!(from_json_tail(padded.as_bytes()), None);
    }

    #[test]
    fn total_saturates() {
        let big = Usage {
            input_tokens: u64::MAX,
            output_tokens: 1,
        };
        assert_eq!(big.total(), u64::MAX);
    }
}

/// Whether an SSE `data:` payload is the usage-only chunk OpenAI sends last
/// when `stream_options.include_usage` is set: `"choices": []` with `usage`.
/// The payload as text, or as the bytes the stream sent (read as
/// [`Outline::text`](crate::sse::Outline::text) decodes them).
pub fn is_usage_only_chunk(data: impl AsRef<[u8]>) -> bool {
    #[derive(serde::Deserialize)]
    struct Chunk {
        #[serde(default)]
        choices: Option<Vec<serde::de::IgnoredAny>>,
        #[serde(default)]
        usage: Option<serde::de::IgnoredAny>,
        #[serde(default)]
        error: Option<serde::de::IgnoredAny>,
    }
    // Most events are not: found out with one SIMD search, built once.
    static USAGE: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"usage\""));
    let data = data.as_ref();
    if USAGE.find(data).is_none() {
        return false;
    }
    let text = crate::utf8_lossy(data);
    // Never an upstream's error that carries usage too: dropped, the
    // client would see a clean stream.
    crate::object_from_str::<Chunk>(&text).is_ok_and(|c| {
        c.usage.is_some() && c.error.is_none() && c.choices.is_none_or(|c| c.is_empty())
    })
}

#[cfg(test)]
mod usage_only_tests {
    use super::is_usage_only_chunk;

    #[test]
    fn an_error_that_carries_usage_is_no_usage_only_chunk() {
        assert!(!is_usage_only_chunk(
            r#"{"error":{"message":"quota"},"usage":{"prompt_tokens":1,"completion_tokens":1}}"#
        ));
    }

    #[test]
    fn detects_the_usage_only_chunk() {
        assert!(is_usage_only_chunk(
            r#"{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}"#
        ));
        assert!(!is_usage_only_chunk(
            r#"{"choices":[{"delta":{}}],"usage":{"prompt_tokens":1}}"#
        ));
        assert!(!is_usage_only_chunk(r#"{"choices":[],"usage":null}"#));
        assert!(!is_usage_only_chunk(
            r#"{"choices":[{"delta":{"content":"usage"}}]}"#
        ));
    }
}

/// A Responses stream's last events.
const END_EVENTS: [&str; 3] = [
    "response.completed",
    "response.incomplete",
    "response.failed",
];

/// Token usage gathered from a stream's events as they pass, in any dialect:
///
/// - chat/completions: the chunk that carries `usage` (with
///   `stream_options.include_usage`);
/// - Responses: `response.completed` (or `.incomplete`/`.failed`), whose
///   `response.usage` has `input_tokens` and `output_tokens`;
/// - Messages: `message_start`'s `message.usage.input_tokens`, then the last
///   `message_delta`'s cumulative `usage.output_tokens`.
#[derive(Clone, Copy, Debug)]
pub struct StreamUsage {
    kind: crate::StreamKind,
    usage: Option<Usage>,
    /// The stream's final count came (chat's usage chunk, Responses' end
    /// event, Messages' `message_delta`), not only Messages' opening one.
    complete: bool,
    /// Events that carried generated tokens.
    delivered: u64,
    /// The stream's last event came (`[DONE]`, Responses' end event,
    /// `message_stop`): what an upstream sends after it is not counted.
    ended: bool,
}

#[derive(serde::Deserialize)]
struct Event {
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    usage: Option<Counts>,
    #[serde(default)]
    message: Option<Nested>,
    #[serde(default)]
    response: Option<Nested>,
}

#[derive(serde::Deserialize)]
struct Nested {
    #[serde(default)]
    usage: Option<Counts>,
}

#[derive(serde::Deserialize, Clone, Copy)]
struct Counts {
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
}

impl Counts {
    /// The counts, when every one is plausible ([`MAX_TOKENS`]).
    fn plausible(self) -> Option<Counts> {
        plausible(&[
            self.input_tokens,
            self.output_tokens,
            self.cache_read_input_tokens,
            self.cache_creation_input_tokens,
        ])
        .then_some(self)
    }

    /// All the input, the prompt cache's included ([`anthropic_input`]).
    fn input(&self) -> Option<u64> {
        anthropic_input(
            self.input_tokens,
            self.cache_read_input_tokens,
            self.cache_creation_input_tokens,
        )
    }
}

impl StreamUsage {
    /// Watch a stream of `kind`.
    pub fn new(kind: crate::StreamKind) -> Self {
        StreamUsage {
            kind,
            usage: None,
            complete: false,
            delivered: 0,
            ended: false,
        }
    }

    /// Look at one event's `data:` payload.
    pub fn observe(&mut self, data: &str) {
        self.observe_event(None, data);
    }

    /// Look at one event: its `event:` name (`None` or empty when it has
    /// none) and its `data:` payload. A name there names the event before
    /// its data's `type`, as the upstream check and the cache read it, so
    /// that all agree on where a stream ends.
    pub fn observe_event(&mut self, name: Option<&str>, data: &str) {
        use crate::StreamKind;
        let name = name.filter(|n| !n.is_empty());
        if self.ended {
            return;
        }
        if self.kind == StreamKind::Chat {
            if data == "[DONE]" {
                self.ended = true;
            } else if let Some(u) = from_sse_data(data) {
                self.usage = Some(u);
                self.complete = true;
            } else if !data.starts_with("{\"error\"") && !data.trim_ascii().is_empty() {
                // A chunk: a token or more (the role's and the finish
                // reason's chunks count too: two at most; an error is none,
                // nor a keep-alive's empty data).
                self.delivered += 1;
            }
            return;
        }
        // Output deltas: `response.output_text.delta`,
        // `response.function_call_arguments.delta`, … and Messages'
        // `content_block_delta`. A substring, not a parse: servers put
        // `type` first or last, and an event whose text ends in `.delta`
        // counts one too many, which a floor can bear. The event is still
        // read for usage below.
        let delta = match self.kind {
            StreamKind::Responses => data.contains(".delta\""),
            StreamKind::Messages => data.contains("\"content_block_delta\""),
            StreamKind::Chat => false,
        };
        self.delivered += u64::from(delta);
        // The last event is read, usage or not; so is one without an
        // `event:` line whose text may hide its type behind an escape
        // (`"message_sto\u0070"`). (Named events, as OpenAI's and
        // Anthropic's all are, are not parsed for text in other scripts,
        // which Python servers send escaped.)
        let last = match (self.kind, name) {
            (StreamKind::Responses, Some(name)) => END_EVENTS.contains(&name),
            (StreamKind::Messages, Some(name)) => name == "message_stop",
            (StreamKind::Responses, None) => END_EVENTS.iter().any(|end| data.contains(end)),
            (StreamKind::Messages, None) => data.contains("message_stop"),
            (StreamKind::Chat, _) => false,
        };
        if !last && !data.contains("usage") && (name.is_some() || !data.contains("\\u")) {
            return;
        }
        let Ok(event) = crate::object_from_str::<Event>(data) else {
            return;
        };
        let kind = name.or(event.kind.as_deref()).unwrap_or("");
        match (self.kind, kind) {
            (
                StreamKind::Responses,
                "response.completed" | "response.incomplete" | "response.failed",
            ) => {
                if let Some(c) = event.response.and_then(|r| r.usage?.plausible()) {
                    self.usage = Some(Usage {
                        input_tokens: c.input().unwrap_or(0),
                        output_tokens: c.output_tokens.unwrap_or(0),
                    });
                    self.complete = true;
                }
            }
            (StreamKind::Messages, "message_start") => {
                // Zeros (or nulls) here are a placeholder, not a count: a
                // model reads at least one token of prompt. A translated
                // stream starts so before its upstream's usage is known.
                if let Some(c) = event.message.and_then(|m| m.usage?.plausible())
                    && (c.input().unwrap_or(0) > 0 || c.output_tokens.unwrap_or(0) > 0)
                {
                    self.usage = Some(Usage {
                        input_tokens: c.input().unwrap_or(0),
                        output_tokens: c.output_tokens.unwrap_or(0),
                    });
                }
            }
            (StreamKind::Messages, "message_delta") => {
                // Null counts: the usage is not known (no count at all).
                if let Some(c) = event
                    .usage
                    .and_then(Counts::plausible)
                    .filter(|c| c.input().is_some() || c.output_tokens.is_some())
                {
                    let mut u = self.usage.unwrap_or_default();
                    if let Some(out) = c.output_tokens {
                        u.output_tokens = out;
                    }
                    if let Some(input) = c.input().filter(|i| *i > 0) {
                        u.input_tokens = input;
                    }
                    self.usage = Some(u);
                    self.complete = true;
                }
            }
            _ => {}
        }
        self.ended = matches!(
            (self.kind, kind),
            (
                StreamKind::Responses,
                "response.completed" | "response.incomplete" | "response.failed"
            ) | (StreamKind::Messages, "message_stop")
        );
    }

    /// The usage seen so far.
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// How many events carried generated tokens, one or more each: a floor
    /// of the output of a stream cut before its usage came (a model server
    /// sends a token an event, or more when it batches them).
    pub fn delivered(&self) -> u64 {
        self.delivered
    }

    /// Whether the usage seen is the stream's final count. Not so for a
    /// Messages stream cut after `message_start`, whose usage (the input,
    /// and one output token) is only a floor of what was generated.
    pub fn is_complete(&self) -> bool {
        self.complete
    }
}

#[cfg(test)]
mod stream_usage_tests {
    use super::*;
    use crate::StreamKind;

    #[test]
    fn counts_past_any_context_window_are_no_usage() {
        let huge = u64::MAX;
        assert_eq!(
            from_json(
                format!(r#"{{"usage":{{"prompt_tokens":{huge},"completion_tokens":1}}}}"#)
                    .as_bytes()
            ),
            None
        );
        assert_eq!(
            from_json(
                format!(r#"{{"usage":{{"prompt_tokens":1,"completion_tokens":{MAX_TOKENS}}}}}"#)
                    .as_bytes()
            ),
            Some(Usage {
                input_tokens: 1,
                output_tokens: MAX_TOKENS
            })
        );
        let mut responses = StreamUsage::new(StreamKind::Responses);
        responses.observe(&format!(
            r#"{{"type":"response.completed","response":{{"usage":{{"input_tokens":{huge},"output_tokens":2}}}}}}"#
        ));
        assert_eq!(responses.usage(), None);
        let mut messages = StreamUsage::new(StreamKind::Messages);
        messages.observe(&format!(
            r#"{{"type":"message_delta","usage":{{"output_tokens":{huge}}}}}"#
        ));
        assert_eq!(messages.usage(), None);
    }

    #[test]
    fn the_last_event_named_by_its_event_line_or_escaped_ends_the_count() {
        let late = r#"{"type":"message_delta","usage":{"output_tokens":999999}}"#;
        let mut named = StreamUsage::new(StreamKind::Messages);
        named.observe_event(Some("message_delta"), r#"{"usage":{"output_tokens":3}}"#);
        named.observe_event(Some("message_stop"), "{}");
        named.observe_event(None, late);
        assert_eq!(named.usage().map(|u| u.output_tokens), Some(3));
        let mut escaped = StreamUsage::new(StreamKind::Responses);
        escaped.observe(
            r#"{"type":"response.completed","response":{"usage":{"input_tokens":2,"output_tokens":2}}}"#,
        );
        escaped.observe(r#"{"type":"response.completed","response":{"usage":{"input_tokens":9,"output_tokens":9}}}"#);
        assert_eq!(escaped.usage().map(|u| u.output_tokens), Some(2));
        let mut hidden = StreamUsage::new(StreamKind::Messages);
        hidden.observe(r#"{"type":"message_stop"}"#);
        hidden.observe(late);
        assert_eq!(hidden.usage(), None);
    }

    #[test]
    fn what_comes_after_the_last_event_is_not_counted() {
        let usage = |input, output| {
            Some(Usage {
                input_tokens: input,
                output_tokens: output,
            })
        };
        let mut chat = StreamUsage::new(StreamKind::Chat);
        chat.observe(r#"{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}"#);
        chat.observe("[DONE]");
        chat.observe(r#"{"choices":[],"usage":{"prompt_tokens":30000,"completion_tokens":30000}}"#);
        chat.observe(r#"{"choices":[{"index":0,"delta":{"content":"a"}}]}"#);
        assert_eq!((chat.usage(), chat.delivered()), (usage(1, 1), 0));
        let mut responses = StreamUsage::new(StreamKind::Responses);
        let completed = |n: u64| {
            format!(
                r#"{{"type":"response.completed","response":{{"usage":{{"input_tokens":{n},"output_tokens":{n}}}}}}}"#
            )
        };
        responses.observe(&completed(2));
        responses.observe(&completed(40000));
        assert_eq!(responses.usage(), usage(2, 2));
        let mut messages = StreamUsage::new(StreamKind::Messages);
        messages.observe(r#"{"type":"message_delta","usage":{"output_tokens":3}}"#);
        messages.observe(r#"{"type":"message_stop"}"#);
        messages.observe(r#"{"type":"message_delta","usage":{"output_tokens":50000}}"#);
        assert_eq!(messages.usage(), usage(0, 3));
    }

    #[test]
    fn messages_usage_from_start_and_last_delta() {
        let mut s = StreamUsage::new(StreamKind::Messages);
        s.observe(r#"{"type":"message_start","message":{"id":"m","usage":{"input_tokens":25,"output_tokens":1}}}"#);
        s.observe(r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"usage"}}"#);
        s.observe(r#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":15}}"#);
        assert_eq!(
            s.usage(),
            Some(Usage {
                input_tokens: 25,
                output_tokens: 15
            })
        );
    }

    #[test]
    fn token_events_are_counted_in_each_dialect() {
        let mut chat = StreamUsage::new(StreamKind::Chat);
        chat.observe(r#"{"choices":[{"index":0,"delta":{"role":"assistant"}}]}"#);
        for _ in 0..3 {
            chat.observe(r#"{"choices":[{"index":0,"delta":{"content":"a"}}]}"#);
        }
        // Keep-alives (`data: ` lines) carry no token.
        chat.observe("");
        chat.observe(" ");
        chat.observe("[DONE]");
        assert_eq!(chat.delivered(), 4);
        let mut responses = StreamUsage::new(StreamKind::Responses);
        for data in [
            r#"{"type":"response.created","response":{"id":"r"}}"#,
            r#"{"type":"response.output_text.delta","delta":"usage"}"#,
            r#"{"type":"response.function_call_arguments.delta","delta":"{"}"#,
            r#"{"type":"response.output_text.done","text":"x"}"#,
            r#"{"response":{"id":"r","output":[{"content":[{"text":"a"}]}],"usage":{"input_tokens":5,"output_tokens":2}},"type":"response.completed"}"#,
        ] {
            responses.observe(data);
        }
        assert_eq!(responses.delivered(), 2);
        assert_eq!(responses.usage().map(|u| u.output_tokens), Some(2));
        let mut messages = StreamUsage::new(StreamKind::Messages);
        for data in [
            r#"{"type":"message_start","message":{"usage":{"input_tokens":2}}}"#,
            r#"{"type":"content_block_start","index":0}"#,
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"hi"}}"#,
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"usage"}}"#,
        ] {
            messages.observe(data);
        }
        assert_eq!(messages.delivered(), 2);
        assert_eq!(messages.usage().map(|u| u.input_tokens), Some(2));
    }

    #[test]
    fn messages_prompt_cache_tokens_are_input() {
        let mut s = StreamUsage::new(StreamKind::Messages);
        s.observe(r#"{"type":"message_start","message":{"id":"m","usage":{"input_tokens":3,"cache_creation_input_tokens":0,"cache_read_input_tokens":40000,"output_tokens":1}}}"#);
        assert_eq!(s.usage().map(|u| u.input_tokens), Some(40003));
        // Newer servers repeat the cumulative counts at the end.
        s.observe(r#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"input_tokens":3,"cache_creation_input_tokens":100,"cache_read_input_tokens":40000,"output_tokens":15}}"#);
        assert_eq!(
            s.usage(),
            Some(Usage {
                input_tokens: 40103,
                output_tokens: 15
            })
        );
    }

    #[test]
    fn messages_placeholder_and_null_counts_are_no_usage() {
        // A stream translated from an upstream that reported no usage.
        let mut s = StreamUsage::new(StreamKind::Messages);
        s.observe(r#"{"type":"message_start","message":{"id":"m","usage":{"input_tokens":0,"output_tokens":0}}}"#);
        assert_eq!(s.usage(), None, "a placeholder, not a count");
        s.observe(r#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"input_tokens":null,"output_tokens":null}}"#);
        assert_eq!(s.usage(), None, "null counts are no usage");
        // The same stream with its usage at the end.
        s.observe(r#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"input_tokens":7,"output_tokens":3}}"#);
        assert_eq!(
            s.usage(),
            Some(Usage {
                input_tokens: 7,
                output_tokens: 3
            })
        );
    }

    #[test]
    fn responses_usage_from_completed() {
        let mut s = StreamUsage::new(StreamKind::Responses);
        s.observe(r#"{"type":"response.created","response":{"id":"r","usage":null}}"#);
        assert_eq!(s.usage(), None);
        s.observe(r#"{"type":"response.completed","response":{"id":"r","usage":{"input_tokens":9,"output_tokens":4,"total_tokens":13}}}"#);
        assert_eq!(
            s.usage(),
            Some(Usage {
                input_tokens: 9,
                output_tokens: 4
            })
        );
    }

    #[test]
    fn chat_usage_chunk() {
        let mut s = StreamUsage::new(StreamKind::Chat);
        s.observe(
            r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#,
        );
        assert_eq!(
            s.usage(),
            Some(Usage {
                input_tokens: 3,
                output_tokens: 2
            })
        );
    }
}

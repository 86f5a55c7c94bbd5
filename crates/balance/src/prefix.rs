//! The routing key of `prefix_affinity`: a chained hash of the prompt's
//! first blocks.
//!
//! The prompt is laid out as the server will see it, in order: a top-level
//! `system` (Anthropic Messages) or `instructions` (Responses), then the
//! chat messages as `role` + text, then `prompt` (completions) or `input`
//! (embeddings, Responses). Turns count up to and including the first one
//! that is not `system` or `developer` (`system` and `instructions` are
//! preamble): the shared preamble and the
//! conversation's first turn, which every later turn of the conversation
//! repeats, so that a conversation keeps its key (and its server, with the
//! turns it has cached) as it grows, however short its turns. That text is
//! cut into blocks of `block_bytes`; `hash_0 = H(seed, block_0)`, `hash_i =
//! H(hash_{i-1}, block_i)`; the key is the hash after the first
//! `prefix_blocks` blocks (or after the last, partial, block of a shorter
//! text). Only those first bytes are ever copied or hashed, so a 100 kB
//! prompt costs what a 2 kB one does.

use serde_json::{Map, Value};

use crate::config::PrefixConfig;
use crate::hash::hash_bytes;

/// Separates a message's role from its text, and two text parts.
const UNIT: u8 = 0x1F;
/// Ends a message.
const RECORD: u8 = 0x1E;
/// The chain's seed: "llm-prox".
const SEED: u64 = 0x6c6c_6d2d_7072_6f78;

/// Builds the routing key of one prompt from its text, in order.
///
/// Used by the balancer on each request's parsed body
/// ([`PromptPrefix::from_json`]) and by simulations that feed text directly.
///
/// ```
/// use llm_proxy_balance::{PrefixConfig, PromptPrefix};
///
/// let cfg = PrefixConfig::default();
/// let mut a = PromptPrefix::new(&cfg);
/// a.push_message("system", "You are terse.");
/// a.push_message("user", "Hello");
/// let mut b = PromptPrefix::new(&cfg);
/// b.push_message("system", "You are terse.");
/// b.push_message("user", "Hello");
/// assert_eq!(a.key(), b.key());
/// ```
#[derive(Clone, Debug)]
pub struct PromptPrefix {
    buf: Vec<u8>,
    limit: usize,
    block: usize,
    /// The conversation's first turn is in: later turns do not count.
    first_turn_in: bool,
}

/// Whether a turn of `role` is part of the preamble that comes before a
/// conversation's first turn: a system or developer message, or a
/// Responses request's `instructions`.
fn is_preamble(role: &str) -> bool {
    matches!(role, "system" | "developer" | "instructions")
}

impl PromptPrefix {
    /// An empty prefix that will keep the first `prefix_blocks × block_bytes`
    /// bytes of canonical text.
    pub fn new(cfg: &PrefixConfig) -> Self {
        let block = cfg.block_bytes_clamped();
        let limit = block.saturating_mul(cfg.prefix_blocks_clamped());
        PromptPrefix {
            buf: Vec::with_capacity(limit.min(64 * 1024)),
            limit,
            block,
            first_turn_in: false,
        }
    }

    /// Whether the key's bytes are complete; later text cannot change it:
    /// the limit is reached, or the conversation's first turn is in.
    pub fn is_full(&self) -> bool {
        self.first_turn_in || self.buf.len() >= self.limit
    }

    /// Append raw text.
    pub fn push_text(&mut self, text: &str) {
        self.push_bytes(text.as_bytes());
    }

    /// Append one chat message: its role, then its text. After the first
    /// message that is not `system` or `developer`, messages count no more.
    pub fn push_message(&mut self, role: &str, text: &str) {
        if self.is_full() {
            return;
        }
        self.push_bytes(role.as_bytes());
        self.push_bytes(&[UNIT]);
        self.push_bytes(text.as_bytes());
        self.push_bytes(&[RECORD]);
        self.end_turn(role);
    }

    /// A turn of `role` was pushed: the first that is not preamble closes
    /// the key.
    fn end_turn(&mut self, role: &str) {
        self.first_turn_in |= !is_preamble(role);
    }

    fn push_bytes(&mut self, bytes: &[u8]) {
        let room = self.limit - self.buf.len().min(self.limit);
        self.buf.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    /// The routing key: the chained hash of the blocks kept. `None` for an
    /// empty prompt (such requests are balanced by load alone).
    pub fn key(&self) -> Option<u64> {
        if self.buf.is_empty() {
            return None;
        }
        Some(self.buf.chunks(self.block).fold(SEED, hash_bytes))
    }

    /// The key of a parsed request body: `system`, `instructions`, each of
    /// `messages` (role and text) up to the first that is not `system` or
    /// `developer`, then `prompt` and `input` (a Responses item with a
    /// `role` is a turn as a message is), in that order.
    pub fn from_json(json: &Map<String, Value>, cfg: &PrefixConfig) -> Option<u64> {
        let mut p = PromptPrefix::new(cfg);
        if let Some(system) = json.get("system") {
            p.push_turn("system", Some(system));
        }
        if let Some(instructions) = json.get("instructions").and_then(Value::as_str) {
            p.push_message("instructions", instructions);
        }
        if let Some(messages) = json.get("messages").and_then(Value::as_array) {
            for message in messages {
                if p.is_full() {
                    break;
                }
                let role = message.get("role").and_then(Value::as_str).unwrap_or("");
                p.push_turn(role, message.get("content"));
            }
        }
        for field in ["prompt", "input"] {
            if let Some(value) = json.get(field) {
                p.push_content(value);
            }
        }
        p.key()
    }

    /// One turn laid out as [`PromptPrefix::push_message`] does.
    fn push_turn(&mut self, role: &str, content: Option<&Value>) {
        if self.is_full() {
            return;
        }
        self.push_bytes(role.as_bytes());
        self.push_bytes(&[UNIT]);
        if let Some(content) = content {
            self.push_content(content);
        }
        self.push_bytes(&[RECORD]);
        self.end_turn(role);
    }

    /// The text of a content value: a string, an array of strings or parts
    /// (`text`, an image's URL, a Responses item's `content`), or token ids.
    fn push_content(&mut self, content: &Value) {
        if self.is_full() {
            return;
        }
        match content {
            Value::String(s) => self.push_text(s),
            Value::Array(items) => {
                for item in items {
                    if self.is_full() {
                        break;
                    }
                    self.push_part(item);
                    self.push_bytes(&[UNIT]);
                }
            }
            Value::Number(n) => self.push_bytes(&n.as_u64().unwrap_or(0).to_le_bytes()),
            Value::Object(_) => self.push_part(content),
            Value::Null | Value::Bool(_) => {}
        }
    }

    fn push_part(&mut self, part: &Value) {
        match part {
            Value::Object(obj) => {
                let role = obj.get("role").and_then(Value::as_str);
                if let Some(role) = role {
                    self.push_text(role);
                    self.push_bytes(&[UNIT]);
                }
                for field in ["text", "content", "image_url", "url", "input_text"] {
                    match obj.get(field) {
                        Some(Value::Object(inner)) => {
                            if let Some(url) = inner.get("url").and_then(Value::as_str) {
                                self.push_text(url);
                            }
                        }
                        Some(value) => self.push_content(value),
                        None => {}
                    }
                }
                // A Responses input item with a role is a turn.
                if let Some(role) = role {
                    self.end_turn(role);
                }
            }
            other => self.push_content(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key(v: Value) -> Option<u64> {
        let Value::Object(map) = v else {
            panic!("an object")
        };
        PromptPrefix::from_json(&map, &PrefixConfig::default())
    }

    #[test]
    fn same_prefix_same_key_beyond_the_limit() {
        let system = "s".repeat(4096);
        let a = key(
            json!({"messages":[{"role":"system","content":system},{"role":"user","content":"a"}]}),
        );
        let b = key(
            json!({"messages":[{"role":"system","content":system},{"role":"user","content":"b"}]}),
        );
        assert_eq!(a, b, "only the first 2 KiB count");
        assert!(a.is_some());
    }

    #[test]
    fn a_conversation_keeps_its_key_as_it_grows() {
        // Short turns: the whole conversation is far below 2 KiB, and each
        // turn repeats the ones before it.
        let mut messages = vec![
            json!({"role": "system", "content": "Be brief."}),
            json!({"role": "developer", "content": "Answer in English."}),
            json!({"role": "user", "content": "What is a prefix cache?"}),
        ];
        let first = key(json!({ "messages": messages }));
        for turn in 0..6 {
            messages.push(json!({"role": "assistant", "content": format!("answer {turn}")}));
            messages.push(json!({"role": "user", "content": format!("question {turn}")}));
            assert_eq!(key(json!({ "messages": messages })), first, "turn {turn}");
        }
        // Another conversation behind the same preamble has a key of its own.
        messages[2] = json!({"role": "user", "content": "What is KV?"});
        assert_ne!(key(json!({ "messages": messages })), first);
        // The preamble counts: the same first turn behind another system prompt.
        let other = key(json!({"messages": [
            {"role": "system", "content": "Be thorough."},
            {"role": "user", "content": "What is a prefix cache?"},
        ]}));
        assert_ne!(other, first);
        // Responses input items: the same rule.
        let items = |n: usize| {
            let mut input =
                vec![json!({"role": "user", "content": [{"type": "input_text", "text": "hi"}]})];
            input.extend((0..n).map(|i| json!({"role": "assistant", "content": format!("a{i}")})));
            key(json!({"instructions": "Be brief.", "input": input}))
        };
        assert!(items(0).is_some());
        assert_eq!(items(0), items(3));
        // Behind the same instructions, another first input is another
        // conversation (the instructions are preamble, not a turn).
        let first_input = |text: &str| key(json!({"instructions": "Be brief.", "input": text}));
        assert_ne!(first_input("hello"), first_input("bonjour"));
        let first_item = |text: &str| {
            key(json!({"instructions": "Be brief.", "input": [{"role": "user", "content": text}]}))
        };
        assert_ne!(first_item("hello"), first_item("bonjour"));
        // Fed as text (the simulation's way), the same key.
        let mut p = PromptPrefix::new(&PrefixConfig::default());
        p.push_message("system", "Be brief.");
        p.push_message("user", "hello");
        p.push_message("assistant", "hi");
        assert_eq!(
            p.key(),
            key(json!({"messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "hello"},
            ]}))
        );
    }

    #[test]
    fn different_first_turns_differ() {
        let a = key(
            json!({"messages":[{"role":"system","content":"x"},{"role":"user","content":"a"}]}),
        );
        let b = key(
            json!({"messages":[{"role":"system","content":"x"},{"role":"user","content":"b"}]}),
        );
        assert_ne!(a, b);
    }

    #[test]
    fn roles_and_boundaries_count() {
        let a = key(json!({"messages":[{"role":"user","content":"ab"}]}));
        let b = key(json!({"messages":[{"role":"assistant","content":"ab"}]}));
        let c =
            key(json!({"messages":[{"role":"user","content":"a"},{"role":"user","content":"b"}]}));
        assert_ne!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn parts_strings_and_prompts() {
        let parts =
            key(json!({"messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}]}));
        let image = key(
            json!({"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"data:x"}}]}]}),
        );
        assert!(parts.is_some() && image.is_some());
        assert_ne!(parts, image);
        assert!(key(json!({"prompt":"once upon"})).is_some());
        assert!(key(json!({"input":["a","b"]})).is_some());
        assert!(key(json!({"input":[1,2,3]})).is_some());
        assert_eq!(key(json!({"model":"m"})), None);
    }

    #[test]
    fn text_and_json_agree() {
        let cfg = PrefixConfig::default();
        let mut p = PromptPrefix::new(&cfg);
        p.push_message("user", "hello");
        assert_eq!(
            p.key(),
            key(json!({"messages":[{"role":"user","content":"hello"}]}))
        );
    }
}

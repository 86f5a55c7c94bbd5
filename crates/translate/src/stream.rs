//! The per-direction stream state machines behind one type, so that the body
//! wrapper ([`TranslateBody`](crate::TranslateBody)) has one thing to drive.

use llm_proxy_core::StreamKind;
use llm_proxy_core::sse::Event;

use crate::chat_over_messages::stream::MessagesToChat;
use crate::messages_over_chat::stream::ChatToMessages;
use crate::responses_over_chat::stream::ChatToResponses;

/// The most content blocks (Anthropic) or output items (Responses) one
/// translated message may have. Real answers have a handful; the bound keeps
/// an upstream-controlled block `index` from sizing the translator's state
/// (an index of 2^40 would otherwise allocate terabytes), and a stream that
/// goes past it fails like any other malformed upstream stream.
pub(crate) const MAX_BLOCKS: usize = 1024;

/// The most bytes of output (text and tool arguments) a translated stream
/// holds: a Responses stream keeps its whole output for
/// `response.completed`, and a tool's arguments wait for its name. The
/// bound of a whole translated answer; past it the stream fails like any
/// other malformed upstream stream.
pub(crate) const MAX_HELD_BYTES: usize = crate::response::MAX_ANSWER_BYTES;

/// What a translation knows of the call a tool-call delta's `index`
/// points at, to tell whether the delta is the next piece of that call or
/// the first of another.
pub(crate) struct CallSoFar<'a> {
    /// The call's id (the upstream's own when `upstream_id`).
    pub id: &'a str,
    /// `id` is the upstream's (not one made up for a call that had none).
    pub upstream_id: bool,
    /// The call's name so far.
    pub name: &'a str,
    /// Where the call's arguments so far stand.
    pub arguments: &'a ArgumentsEnd,
}

/// Whether a tool-call delta at the index of `call` is another call.
///
/// - One that names a function under another non-empty id. Some servers
///   (Ollama) give every call of a turn index 0, each with its own id and
///   name; read by index alone they would merge into one call with the
///   arguments of both. Others (LM Studio, mlx) send a new id with every
///   piece of one call's arguments, without a name: those pieces are the
///   same call.
/// - One that names a function once `call`'s arguments are one whole JSON
///   value, and carries arguments or a name other than the call's: Gemini's
///   OpenAI-compatible API sends each parallel call whole in its own chunk,
///   every one at index 0 and none with an id. MiniMax repeats the name
///   with every piece of one call's arguments: while they are unfinished
///   the pieces join, and a bare repeat of the name after them adds
///   nothing (read as a call, it would invent one without arguments).
pub(crate) fn is_another_call(
    call: &CallSoFar<'_>,
    delta: &crate::chat::ToolCallDelta<'_>,
) -> bool {
    if !names_a_function(delta) {
        return false;
    }
    let new_id = delta
        .id
        .as_deref()
        .is_some_and(|new| !new.is_empty() && new != call.id);
    if call.upstream_id && new_id {
        return true;
    }
    // Its own upstream id: by definition the same call.
    if call.upstream_id && delta.id.as_deref() == Some(call.id) {
        return false;
    }
    let function = delta.function.as_ref();
    // (A piece of whitespace carries no arguments of a call of its own.)
    let arguments = function
        .and_then(|f| f.arguments.as_deref())
        .is_some_and(|a| !a.trim().is_empty());
    let repeats_the_name = function.and_then(|f| f.name.as_deref()) == Some(call.name);
    call.arguments.is_complete() && (arguments || !repeats_the_name)
}

/// Whether a tool call's arguments, read a piece at a time, are one whole
/// JSON object or array yet (tool arguments are objects): the nesting and
/// strings are followed as the pieces come, so no piece is read twice and
/// the arguments need not be kept. Invalid JSON is not told apart from
/// valid: arguments that close their outermost bracket are complete.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct ArgumentsEnd {
    state: ArgumentsState,
    /// Open brackets.
    depth: u32,
    in_string: bool,
    escaped: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum ArgumentsState {
    /// Nothing but whitespace so far.
    #[default]
    Empty,
    /// Inside the outermost object or array.
    Open,
    /// The outermost bracket closed, nothing but whitespace after it.
    Complete,
    /// Something else: a value that is not an object or array, or more
    /// after the outermost bracket closed.
    Other,
}

impl ArgumentsEnd {
    /// Take the next piece of the arguments.
    pub(crate) fn push(&mut self, piece: &str) {
        for &byte in piece.as_bytes() {
            match self.state {
                ArgumentsState::Other => return,
                ArgumentsState::Empty | ArgumentsState::Complete => {
                    if byte.is_ascii_whitespace() {
                        continue;
                    }
                    self.state = match (self.state, byte) {
                        (ArgumentsState::Empty, b'{' | b'[') => {
                            self.depth = 1;
                            ArgumentsState::Open
                        }
                        _ => ArgumentsState::Other,
                    };
                }
                ArgumentsState::Open if self.in_string => match byte {
                    _ if self.escaped => self.escaped = false,
                    b'\\' => self.escaped = true,
                    b'"' => self.in_string = false,
                    _ => {}
                },
                ArgumentsState::Open => match byte {
                    b'"' => self.in_string = true,
                    b'{' | b'[' => self.depth = self.depth.saturating_add(1),
                    b'}' | b']' => {
                        self.depth -= 1;
                        if self.depth == 0 {
                            self.state = ArgumentsState::Complete;
                        }
                    }
                    _ => {}
                },
            }
        }
    }

    /// The arguments so far are one whole JSON object or array.
    pub(crate) fn is_complete(&self) -> bool {
        self.state == ArgumentsState::Complete
    }
}

fn names_a_function(delta: &crate::chat::ToolCallDelta<'_>) -> bool {
    delta
        .function
        .as_ref()
        .and_then(|f| f.name.as_deref())
        .is_some_and(|name| !name.is_empty())
}

/// Add a piece of a tool's name to what came of it: some servers (Gemini's
/// OpenAI-compatible API) split a name across deltas, others (MiniMax)
/// repeat the whole name in every delta; a piece equal to the name so far
/// is such a repeat.
pub(crate) fn join_name(name: &mut String, piece: &str) {
    if *name != piece {
        name.push_str(piece);
    }
}

/// The chat `index` of the call a tool-call delta belongs to, among the
/// calls so far (`(index, id)`, oldest first; `id` empty when the upstream
/// gave none). Its own `index` when it has one; without (some servers send
/// none): the call whose id it repeats, else a new call when it names a
/// function, else the last call (the next piece of its arguments), else a
/// new one (`next`).
pub(crate) fn chat_index<'a>(
    delta: &crate::chat::ToolCallDelta<'_>,
    mut calls: impl DoubleEndedIterator<Item = (u64, &'a str)> + Clone,
    next: u64,
) -> u64 {
    if let Some(index) = delta.index {
        return index;
    }
    let id = delta.id.as_deref().filter(|id| !id.is_empty());
    if let Some((index, _)) = id.and_then(|id| calls.clone().rev().find(|(_, known)| *known == id))
    {
        return index;
    }
    if names_a_function(delta) {
        return next;
    }
    calls.next_back().map_or(next, |(index, _)| index)
}

/// What happened to one upstream event.
#[derive(Debug, PartialEq)]
pub(crate) enum Step {
    /// Translated (possibly into nothing); go on.
    Continue,
    /// The upstream stream is broken or reported an error: end the client's
    /// stream with its dialect's error event carrying this message.
    Fail(String),
}

/// The state machine of one translated stream.
#[derive(Debug)]
pub(crate) enum StreamMap {
    /// Chat chunks -> Anthropic events.
    ChatToMessages(Box<ChatToMessages>),
    /// Anthropic events -> chat chunks.
    MessagesToChat(Box<MessagesToChat>),
    /// Chat chunks -> Responses events.
    ChatToResponses(Box<ChatToResponses>),
}

impl StreamMap {
    /// Translate one upstream event, appending the client's events to `out`.
    /// A blank event (empty data: a keep-alive some servers send between
    /// chunks) carries nothing, in any dialect, and translates into nothing.
    pub(crate) fn event(&mut self, event: &Event, out: &mut Vec<u8>) -> Step {
        if event.is_blank() {
            return Step::Continue;
        }
        match self {
            StreamMap::ChatToMessages(m) => m.event(event, out),
            StreamMap::MessagesToChat(m) => m.event(event, out),
            StreamMap::ChatToResponses(m) => m.event(event, out),
        }
    }

    /// Whether the client's stream has had its last event.
    pub(crate) fn is_finished(&self) -> bool {
        match self {
            StreamMap::ChatToMessages(m) => m.is_finished(),
            StreamMap::MessagesToChat(m) => m.is_finished(),
            StreamMap::ChatToResponses(m) => m.is_finished(),
        }
    }

    /// Queue the client's error event for a stream broken by `reason`, in
    /// its dialect's shape. A Responses client first gets the
    /// `response.created` (and `in_progress`) it must see before anything,
    /// should nothing have come yet, so that SDK stream helpers read the
    /// error as the API's and not as a malformed stream; and its `error`
    /// event is numbered (`sequence_number`) as every other event.
    pub(crate) fn fail_event(&mut self, reason: &str, out: &mut Vec<u8>) {
        match self {
            StreamMap::ChatToResponses(m) => m.interrupted(reason, out),
            _ => out.extend_from_slice(&llm_proxy_core::Error::stream_interrupted_event_for(
                self.client_kind(),
                reason,
                // Chat and Messages events are not numbered.
                &Default::default(),
            )),
        }
    }

    /// The client's stream kind, for its error event.
    pub(crate) fn client_kind(&self) -> StreamKind {
        match self {
            StreamMap::ChatToMessages(_) => StreamKind::Messages,
            StreamMap::MessagesToChat(_) => StreamKind::Chat,
            StreamMap::ChatToResponses(_) => StreamKind::Responses,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh stream translation of each direction, and a stream its
    /// upstream could send: one text, finished.
    fn directions() -> [(StreamMap, &'static str); 3] {
        const CHAT: &str = concat!(
            "data: {\"id\":\"chatcmpl-7\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Hi\"}}]}\n\n",
            "data: {\"id\":\"chatcmpl-7\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
            "data: {\"id\":\"chatcmpl-7\",\"created\":1,\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1}}\n\n",
            "data: [DONE]\n\n",
        );
        const MESSAGES: &str = concat!(
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_7\",\"model\":\"c\",\"usage\":{\"input_tokens\":3}}}\n\n",
            "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n",
            "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":1}}\n\n",
            "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
        );
        [
            (
                StreamMap::ChatToMessages(Box::new(ChatToMessages::new(Default::default()))),
                CHAT,
            ),
            (
                StreamMap::ChatToResponses(Box::new(ChatToResponses::new(Default::default()))),
                CHAT,
            ),
            (
                StreamMap::MessagesToChat(Box::new(MessagesToChat::new(Default::default()))),
                MESSAGES,
            ),
        ]
    }

    /// Translate a whole upstream stream: the client's events (as JSON,
    /// without the proxy clock's `created`), and whether it was finished
    /// with no step failing.
    fn translate(map: &mut StreamMap, upstream: &str) -> (Vec<serde_json::Value>, bool) {
        let mut parser = llm_proxy_core::sse::Parser::new();
        parser.push(upstream.as_bytes()).unwrap();
        let mut out = Vec::new();
        let mut clean = true;
        while let Some(event) = parser.next_event() {
            clean &= map.event(&event, &mut out) == Step::Continue;
        }
        let events = crate::test_util::events(&out)
            .into_iter()
            .map(|(_, mut json)| {
                if let Some(object) = json.as_object_mut() {
                    object.shift_remove("created");
                }
                json
            })
            .collect();
        (events, clean && map.is_finished())
    }

    #[test]
    fn keep_alives_translate_into_nothing_in_every_direction() {
        // Before every event: a comment, and events whose data is empty or
        // only whitespace (`data: ` lines some servers send to keep the
        // connection busy).
        const KEEP_ALIVES: &str = ": ping\n\ndata: \n\ndata:\n\ndata:  \ndata:\n\n";
        for ((mut map, upstream), (mut again, _)) in directions().into_iter().zip(directions()) {
            let with_keep_alives: String = upstream
                .split_inclusive("\n\n")
                .flat_map(|event| [KEEP_ALIVES, event])
                .chain([KEEP_ALIVES])
                .collect();
            let (plain, clean) = translate(&mut map, upstream);
            assert!(clean, "{plain:?}");
            let (kept, clean) = translate(&mut again, &with_keep_alives);
            assert!(clean, "keep-alives fail no stream: {kept:?}");
            // (Every id here is the upstream's: none is made up afresh.)
            assert_eq!(kept, plain);
        }
    }

    /// A chat stream that ends before its answer finished, or that the
    /// upstream gave up on, is no answer in either dialect it is translated
    /// into: its first failure says why, and no event of a clean end
    /// (Messages' `message_delta` and `message_stop`, a Responses item's
    /// `….done` and `response.completed`) came before it. (The body reads
    /// nothing past the first failure.)
    #[test]
    fn an_unfinished_chat_stream_is_no_answer_in_any_dialect() {
        for (chunks, why) in crate::test_util::unfinished_streams() {
            let chat = directions()
                .into_iter()
                .filter(|(map, _)| !matches!(map, StreamMap::MessagesToChat(_)));
            for (mut map, _) in chat {
                let mut out = Vec::new();
                let failed = chunks
                    .iter()
                    .map(|chunk| map.event(&crate::test_util::data(chunk), &mut out))
                    .find(|step| *step != Step::Continue);
                assert_eq!(failed, Some(Step::Fail(why.clone())), "{chunks:?}");
                let names = crate::test_util::names(&crate::test_util::events(&out));
                assert!(
                    !names.iter().any(|n| {
                        ["message_delta", "message_stop", "response.completed"]
                            .contains(&n.as_str())
                            || n.ends_with(".done")
                    }),
                    "{chunks:?}: {names:?}"
                );
            }
        }
    }

    /// An upstream that gives two calls of one answer the same id: the
    /// second gets a fresh one, in either dialect (the client pairs results
    /// to calls by id alone, and Anthropic refuses repeated `tool_use` ids).
    #[test]
    fn a_tool_call_id_repeated_in_one_answer_is_given_once() {
        let call = |index: u32, name: &str| {
            format!(
                r#"{{"choices":[{{"index":0,"delta":{{"tool_calls":[{{"index":{index},"id":"call_1","type":"function","function":{{"name":"{name}","arguments":"{{}}"}}}}]}}}}]}}"#
            )
        };
        let chunks = [
            call(0, "f"),
            call(1, "g"),
            r#"{"choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}"#.to_owned(),
            "[DONE]".to_owned(),
        ];
        let chat = directions()
            .into_iter()
            .filter(|(map, _)| !matches!(map, StreamMap::MessagesToChat(_)));
        for (mut map, _) in chat {
            let mut out = Vec::new();
            for chunk in &chunks {
                assert_eq!(
                    map.event(&crate::test_util::data(chunk), &mut out),
                    Step::Continue
                );
            }
            let ids: Vec<String> = crate::test_util::events(&out)
                .iter()
                .filter_map(|(_, v)| {
                    let block = &v["content_block"];
                    let item = &v["item"];
                    match (v["type"].as_str(), item["type"].as_str()) {
                        (Some("content_block_start"), _) if block["type"] == "tool_use" => {
                            block["id"].as_str()
                        }
                        (Some("response.output_item.added"), Some("function_call")) => {
                            item["call_id"].as_str()
                        }
                        _ => None,
                    }
                    .map(str::to_owned)
                })
                .collect();
            assert_eq!(ids.len(), 2, "{ids:?}");
            assert_eq!(ids[0], "call_1");
            assert!(ids[1] != "call_1" && !ids[1].is_empty(), "{ids:?}");
        }
    }

    /// Where `pieces` leave a call's arguments.
    fn end_of(pieces: &[&str]) -> ArgumentsEnd {
        let mut end = ArgumentsEnd::default();
        for piece in pieces {
            end.push(piece);
        }
        end
    }

    #[test]
    fn a_delta_with_the_calls_own_id_or_only_whitespace_is_the_same_call() {
        let whole = end_of(&[r#"{"a":1}"#]);
        let call = CallSoFar {
            id: "call_1",
            upstream_id: true,
            name: "f",
            arguments: &whole,
        };
        for text in [
            r#"{"index":0,"id":"call_1","function":{"name":"f","arguments":"\n"}}"#,
            r#"{"index":0,"id":"call_1","function":{"name":"f","arguments":"{}"}}"#,
            r#"{"index":0,"function":{"name":"f","arguments":" "}}"#,
        ] {
            let delta: crate::chat::ToolCallDelta<'_> = serde_json::from_str(text).unwrap();
            assert!(!is_another_call(&call, &delta), "{text}");
        }
        let another = r#"{"index":0,"function":{"name":"f","arguments":"{}"}}"#;
        let delta: crate::chat::ToolCallDelta<'_> = serde_json::from_str(another).unwrap();
        assert!(is_another_call(&call, &delta));
    }

    #[test]
    fn arguments_are_complete_where_json_reads_one_object_or_array() {
        let texts = [
            "",
            "  ",
            "{}",
            " { } \n",
            r#"{"path":"a.md"}"#,
            r#"{"a":{"b":[1,{"c":"}"}]},"d":"\"}"}"#,
            r#"{"q":"\\"}"#,
            "[1,2]",
            r#"{"a":"#,
            r#"{"a":"}"#,
            r#"{"a":{"b":1}"#,
            r#"{"a":1}{"b":2}"#,
            r#"{"a":1} x"#,
            "\"text\"",
            "42",
        ];
        for text in texts {
            let whole = text.trim_start().starts_with(['{', '['])
                && serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok();
            // Cut anywhere, in any number of pieces: the same answer.
            for cut in (0..=text.len()).filter(|&c| text.is_char_boundary(c)) {
                let (a, b) = text.split_at(cut);
                assert_eq!(
                    end_of(&[a, b]).is_complete(),
                    whole,
                    "{text:?} cut at {cut}"
                );
            }
            let bytes: Vec<String> = text.chars().map(String::from).collect();
            let pieces: Vec<&str> = bytes.iter().map(String::as_str).collect();
            assert_eq!(
                end_of(&pieces).is_complete(),
                whole,
                "{text:?} a char at a time"
            );
        }
    }

    #[test]
    fn a_named_delta_after_whole_arguments_is_another_call() {
        let delta = |id: Option<&str>, name: Option<&str>, arguments: &str| {
            let json = serde_json::json!({"index": 0, "id": id,
                "function": {"name": name, "arguments": arguments}});
            json.to_string()
        };
        let is_another = |so_far: &CallSoFar<'_>, text: &str| {
            let delta: crate::chat::ToolCallDelta<'_> = serde_json::from_str(text).unwrap();
            is_another_call(so_far, &delta)
        };
        let whole = end_of(&[r#"{"path":"a.md"}"#]);
        let open = end_of(&[r#"{"path":"#]);
        let call = |arguments, upstream_id| CallSoFar {
            id: "call_a",
            upstream_id,
            name: "read",
            arguments,
        };
        // Gemini: the next call whole, same name or another.
        assert!(is_another(
            &call(&whole, false),
            &delta(None, Some("read"), "{}")
        ));
        assert!(is_another(
            &call(&whole, false),
            &delta(None, Some("list"), "")
        ));
        // MiniMax: the name repeated with the pieces of one call.
        assert!(!is_another(
            &call(&open, false),
            &delta(None, Some("read"), "\"a\"}")
        ));
        assert!(!is_another(
            &call(&whole, false),
            &delta(None, Some("read"), "")
        ));
        // No name: more of the call (LM Studio's fresh ids too).
        assert!(!is_another(
            &call(&whole, true),
            &delta(Some("call_b"), None, "}")
        ));
        // Ollama: a new id with a name.
        assert!(is_another(
            &call(&open, true),
            &delta(Some("call_b"), Some("read"), "")
        ));
        assert!(!is_another(
            &call(&open, true),
            &delta(Some("call_a"), Some("read"), "")
        ));
    }
}

//! An incremental Server-Sent-Events parser and encoder.
//!
//! The proxy watches streamed responses (to count tokens, to tee them into a
//! cache, to notice a stream cut mid-event) while forwarding every byte
//! unchanged. The observing code sits inside an `http_body::Body` poll, so it
//! is handed chunks as they arrive and must not take over the stream. The
//! existing crates (`eventsource-stream` and friends) are pull-based `Stream`
//! adapters that own the byte stream; [`Parser`] is push-based instead: feed
//! it any chunk with [`Parser::push`], then pop complete events with
//! [`Parser::next_event`].
//!
//! Parsing follows the WHATWG EventSource rules: lines end with `\r\n`, `\n`
//! or `\r`; `:` starts a comment; `data` lines are joined with `\n`; a blank
//! line dispatches the event; a leading UTF-8 BOM is skipped. Chunks may be
//! split anywhere, including between `\r` and `\n` or inside a multi-byte
//! UTF-8 character.
//!
//! [`encode`] and [`encode_data`] write events back out.

use std::collections::VecDeque;

use bytes::Bytes;

use crate::BodyBudget;
use crate::budget::{Claim, Pool};

/// The `data` payload that ends an OpenAI-style stream.
pub const DONE: &str = "[DONE]";

/// The default limit of [`Parser::new`]: 32 MiB, the bound of a whole
/// translated answer. One event can be that large in earnest: a Responses
/// stream repeats the whole response in `response.completed`, with an
/// image tool's base64 images, and `response.created` carries the request's
/// `instructions`. Past it, a stream counts as broken.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 32 << 20;

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// One dispatched Server-Sent Event.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// The `event` field; `None` when absent or empty, which the spec reads
    /// as `message`.
    pub event: Option<String>,
    /// The `data` lines of the event, joined with `\n`.
    pub data: String,
    /// The `id` field set in this event, if any. Unlike the spec's "last
    /// event ID", this does not carry over from earlier events; see
    /// [`Parser::last_event_id`] for that.
    pub id: Option<String>,
    /// The `retry` field set in this event, in milliseconds, if it was all
    /// digits.
    pub retry: Option<u64>,
}

impl Event {
    /// Whether this is the `data: [DONE]` sentinel that ends an OpenAI stream.
    pub fn is_done(&self) -> bool {
        self.data == DONE
    }

    /// Whether the event's data is empty or only whitespace: a keep-alive
    /// (some servers send `data: ` lines, or empty data events, between
    /// chunks), which carries nothing. A comment line (`: ping`) makes no
    /// event at all.
    pub fn is_blank(&self) -> bool {
        self.data.trim_ascii().is_empty()
    }
}

/// What can go wrong while parsing an event stream.
#[derive(Debug, thiserror::Error)]
pub enum SseError {
    /// One event (its buffered fields plus the unfinished line) grew past the
    /// parser's limit.
    #[error("server-sent event is larger than the limit of {limit} bytes")]
    EventTooLarge {
        /// The limit, in bytes.
        limit: usize,
    },
    /// The event being assembled would take the budget it counts against
    /// ([`Parser::bounded_by`]) past its bound: too much is held at once,
    /// by all streams together.
    #[error(
        "server-sent event cannot be held: the bytes held at once would pass the limit of {limit} bytes"
    )]
    OverBudget {
        /// The budget's bound, in bytes.
        limit: usize,
    },
}

/// A push-based, incremental Server-Sent-Events parser.
///
/// ```
/// use llm_proxy_core::sse::Parser;
///
/// let mut parser = Parser::new();
/// parser.push(b"data: hel").unwrap();
/// assert!(parser.next_event().is_none());
/// parser.push(b"lo\n\ndata: [DONE]\n\n").unwrap();
/// assert_eq!(parser.next_event().unwrap().data, "hello");
/// assert!(parser.next_event().unwrap().is_done());
/// ```
#[derive(Debug)]
pub struct Parser {
    max_event_bytes: usize,
    lines: Lines,
    /// Where in the chunk pushed last the last event ended (see
    /// [`Parser::last_event_end`]).
    last_event_end: Option<usize>,
    event: Building,
    ready: VecDeque<Event>,
    /// The event [`Parser::next_event_ref`] lent out last.
    lent: Option<Event>,
    /// Buffers of events that were lent and are done with, reused for the
    /// next events' data and names instead of allocating afresh.
    spare_data: Vec<String>,
    spare_names: Vec<String>,
    /// Where the events in `ready` lie in the stream, when asked for
    /// ([`Parser::with_spans`]); `None` when not.
    spans: Option<Spans>,
}

/// Where in the stream the events a [`Parser`] read lie.
#[derive(Debug, Default)]
struct Spans {
    /// Bytes pushed before the current chunk.
    pushed: u64,
    /// Just past the blank line that ended the last event (of any kind).
    boundary: u64,
    /// One per event in `ready`, in order.
    ready: VecDeque<std::ops::Range<u64>>,
}

/// The fields of the event being read, and what carries over between events.
#[derive(Debug, Default)]
struct Building {
    /// A field line of the current event has been seen.
    in_event: bool,
    /// Data lines of the current event, each followed by `\n`.
    data: String,
    event_type: String,
    id: Option<String>,
    retry: Option<u64>,
    last_event_id: String,
    reconnection_time: Option<u64>,
}

/// The longest `id` kept as the stream's last event id (see
/// [`Parser::last_event_id`]).
const MAX_LAST_EVENT_ID: usize = 1024;

/// At most this many spare buffers of each kind are kept.
const MAX_SPARE: usize = 4;
/// A buffer that grew larger than this (for one large event) is dropped, not
/// kept for the events after it.
const MAX_SPARE_CAPACITY: usize = 64 * 1024;

impl Default for Parser {
    fn default() -> Self {
        Self::new()
    }
}

impl Parser {
    /// A parser that accepts events of up to [`DEFAULT_MAX_EVENT_BYTES`].
    pub fn new() -> Self {
        Self::with_max_event_bytes(DEFAULT_MAX_EVENT_BYTES)
    }

    /// A parser that fails with [`SseError::EventTooLarge`] once the event
    /// being assembled (its fields plus the unfinished line) exceeds `limit`
    /// bytes. Dispatched events waiting in [`Parser::next_event`] do not count.
    pub fn with_max_event_bytes(limit: usize) -> Self {
        Self {
            max_event_bytes: limit,
            lines: Lines::default(),
            last_event_end: None,
            event: Building::default(),
            ready: VecDeque::new(),
            lent: None,
            spare_data: Vec::new(),
            spare_names: Vec::new(),
            spans: None,
        }
    }

    /// Also say where in the stream each event lies
    /// ([`Parser::next_event_with_span`]).
    pub fn with_spans(mut self) -> Self {
        self.spans = Some(Spans::default());
        self
    }

    /// Count the bytes of the event being assembled (its fields and its
    /// unfinished line) in `budget`'s pool for answers
    /// ([`BodyBudget::answers_in_use`]) while they are held, never refusing
    /// them: many streams at once could each hold an event of up to the
    /// event limit, in each layer that watches them, and the parser that
    /// bounds a stream ([`Parser::bounded_by`]) sees them all. Events that
    /// lie whole in the chunk pushed are not held, and cost nothing. `None`
    /// counts nothing.
    pub fn counted_in(mut self, budget: Option<&BodyBudget>) -> Self {
        self.lines.count_in(budget, false);
        self
    }

    /// [`Parser::counted_in`], and bounded by it: when the event held would
    /// take the pool past the budget's limit, [`Parser::push`] fails with
    /// [`SseError::OverBudget`]. For the layer that can end its stream with
    /// an error when that happens.
    pub fn bounded_by(mut self, budget: Option<&BodyBudget>) -> Self {
        self.lines.count_in(budget, true);
        self
    }

    /// Feeds the next bytes of the stream. Complete events become available
    /// from [`Parser::next_event`].
    ///
    /// On error the unfinished event and the rest of `chunk` are discarded;
    /// the stream is not trustworthy after that and should not be fed on.
    pub fn push(&mut self, chunk: &[u8]) -> Result<(), SseError> {
        self.last_event_end = None;
        let Self {
            max_event_bytes,
            lines,
            event,
            ready,
            spare_data,
            spare_names,
            spans,
            ..
        } = self;
        let limit = *max_event_bytes;
        let split = lines.split(chunk, |line, line_end| {
            let ends = event.line(line.bytes(), limit)?;
            if ends {
                let dispatched = event.dispatch(ready, spare_data, spare_names);
                if let Some(spans) = spans.as_mut() {
                    let end = spans.pushed + line_end as u64;
                    if dispatched {
                        spans.ready.push_back(spans.boundary..end);
                    }
                    spans.boundary = end;
                }
            }
            Ok(ends)
        });
        if let Some(spans) = self.spans.as_mut() {
            spans.pushed += chunk.len() as u64;
        }
        let (last_event_end, tail) = match split {
            Ok(split) => split,
            Err(e) => {
                self.reset_event();
                return Err(e);
            }
        };
        self.last_event_end = last_event_end;
        let held = self.event.buffered_bytes();
        if let Err(e) = self.lines.keep(tail, held, self.max_event_bytes) {
            self.reset_event();
            return Err(e);
        }
        Ok(())
    }

    /// Where in the chunk given to the last [`Parser::push`] the last event
    /// ended, just past its blank line (an event without data counts too);
    /// `None` when no event ended in it. The bytes before are whole events
    /// and comments, the bytes after the start of the next.
    pub fn last_event_end(&self) -> Option<usize> {
        self.last_event_end
    }

    /// Pops the next complete event, in stream order.
    pub fn next_event(&mut self) -> Option<Event> {
        self.pop()
    }

    /// [`Parser::next_event`], with where the event lies in the stream
    /// (offsets from the first byte pushed): from just past the blank line
    /// that ended the event before it (so with the comments, and the blank
    /// lines and events without data, between the two) to just past its
    /// own blank line. The span is empty for a parser made without
    /// [`Parser::with_spans`].
    ///
    /// ```
    /// use llm_proxy_core::sse::Parser;
    ///
    /// let mut parser = Parser::new().with_spans();
    /// parser.push(b"data: a\n\n: ping\n").unwrap();
    /// parser.push(b"data: b\n\n").unwrap();
    /// assert_eq!(parser.next_event_with_span().unwrap().1, 0..9);
    /// // With the comment before it.
    /// assert_eq!(parser.next_event_with_span().unwrap().1, 9..25);
    /// ```
    pub fn next_event_with_span(&mut self) -> Option<(Event, std::ops::Range<u64>)> {
        let span = match self.spans.as_mut() {
            Some(spans) => spans.ready.front().cloned().unwrap_or_default(),
            None => 0..0,
        };
        Some((self.pop()?, span))
    }

    /// The next ready event, and its span gone with it.
    fn pop(&mut self) -> Option<Event> {
        let event = self.ready.pop_front()?;
        if let Some(spans) = self.spans.as_mut() {
            spans.ready.pop_front();
        }
        Some(event)
    }

    /// Like [`Parser::next_event`], but lends the event instead of giving it
    /// away: its buffers return to the parser for the events after it, so a
    /// caller that only reads events (most do) costs no allocation per event
    /// once the parser has warmed up.
    ///
    /// ```
    /// use llm_proxy_core::sse::Parser;
    ///
    /// let mut parser = Parser::new();
    /// parser.push(b"event: a\ndata: 1\n\nevent: b\ndata: 2\n\n").unwrap();
    /// let mut names = Vec::new();
    /// while let Some(event) = parser.next_event_ref() {
    ///     names.push(format!("{}={}", event.event.as_deref().unwrap_or(""), event.data));
    /// }
    /// assert_eq!(names, ["a=1", "b=2"]);
    /// ```
    pub fn next_event_ref(&mut self) -> Option<&Event> {
        if let Some(done) = self.lent.take() {
            self.recycle(done);
        }
        let event = self.pop()?;
        Some(self.lent.insert(event))
    }

    /// Keep `event`'s buffers (cleared) for later events.
    fn recycle(&mut self, event: Event) {
        let Event {
            event, mut data, ..
        } = event;
        if data.capacity() <= MAX_SPARE_CAPACITY && self.spare_data.len() < MAX_SPARE {
            data.clear();
            self.spare_data.push(data);
        }
        if let Some(mut name) = event
            && name.capacity() <= MAX_SPARE_CAPACITY
            && self.spare_names.len() < MAX_SPARE
        {
            name.clear();
            self.spare_names.push(name);
        }
    }

    /// Ends the stream. The spec discards an event that was not terminated by
    /// a blank line, so this always returns `None`; it resets the parser for
    /// a new stream (events already complete stay available from
    /// [`Parser::next_event`]). Check [`Parser::has_partial`] first to learn
    /// whether an event was cut off.
    pub fn finish(&mut self) -> Option<Event> {
        self.reset_event();
        self.lines.restart();
        None
    }

    /// Whether bytes of an unfinished line or event are buffered: at end of
    /// stream, a sign that the stream was cut mid-event. Comment lines alone
    /// (keep-alives) do not count.
    pub fn has_partial(&self) -> bool {
        self.lines.buffered() > 0 || self.event.in_event
    }

    /// The spec's "last event ID": the latest `id` field seen in the stream,
    /// empty if none. It carries over from event to event. An id longer than
    /// 1 KiB is not kept (it would be held for the rest of the stream): it
    /// reads as empty.
    pub fn last_event_id(&self) -> &str {
        &self.event.last_event_id
    }

    /// The spec's reconnection time: the latest valid `retry` field seen in
    /// the stream, in milliseconds.
    pub fn reconnection_time(&self) -> Option<u64> {
        self.event.reconnection_time
    }

    fn reset_event(&mut self) {
        self.lines.clear();
        self.event.reset();
    }
}

impl Building {
    fn buffered_bytes(&self) -> usize {
        self.data.len() + self.event_type.len() + self.id.as_ref().map_or(0, String::len)
    }

    fn reset(&mut self) {
        self.data.clear();
        if self.data.capacity() > MAX_SPARE_CAPACITY {
            self.data = String::new();
        }
        self.event_type.clear();
        if self.event_type.capacity() > MAX_SPARE_CAPACITY {
            self.event_type = String::new();
        }
        self.id = None;
        self.retry = None;
        self.in_event = false;
    }

    /// Handles one complete line, without its terminator; `true` when it was
    /// the blank line that ends an event (which the caller then dispatches).
    fn line(&mut self, line: &[u8], limit: usize) -> Result<bool, SseError> {
        let (name, value) = match field(line) {
            Field::Blank => return Ok(true),
            Field::Comment => return Ok(false),
            Field::Named(name, value) => (name, value),
        };
        self.in_event = true;
        // Line breaks and ':' are ASCII, so decoding each value on its own is
        // the same as decoding the whole stream first, as the spec does.
        match name {
            b"data" => {
                push_lossy(&mut self.data, value);
                self.data.push('\n');
            }
            b"event" => {
                self.event_type.clear();
                push_lossy(&mut self.event_type, value);
            }
            b"id" if !value.contains(&0) => {
                let id = String::from_utf8_lossy(value);
                self.last_event_id.clear();
                // Kept for the whole stream, and counted by nothing: an id
                // longer than this is the event's own, not remembered.
                if id.len() <= MAX_LAST_EVENT_ID {
                    self.last_event_id.push_str(&id);
                } else {
                    self.last_event_id.shrink_to_fit();
                }
                self.id = Some(id.into_owned());
            }
            b"retry" if !value.is_empty() && value.iter().all(u8::is_ascii_digit) => {
                if let Ok(millis) = String::from_utf8_lossy(value).parse() {
                    self.retry = Some(millis);
                    self.reconnection_time = Some(millis);
                }
            }
            _ => {}
        }
        if self.buffered_bytes() > limit {
            self.reset();
            return Err(SseError::EventTooLarge { limit });
        }
        Ok(false)
    }

    /// Ends the event: into `ready` if it has data (`true`), else dropped.
    fn dispatch(
        &mut self,
        ready: &mut VecDeque<Event>,
        spare_data: &mut Vec<String>,
        spare_names: &mut Vec<String>,
    ) -> bool {
        self.in_event = false;
        let id = self.id.take();
        let retry = self.retry.take();
        if self.data.is_empty() {
            self.event_type.clear();
            return false;
        }
        self.data.pop(); // the `\n` after the last data line
        // The next event's buffers: a spare one (see `next_event_ref`), or
        // one that starts at this event's size instead of growing again from
        // nothing.
        let event = (!self.event_type.is_empty()).then(|| {
            let name = spare_names.pop().unwrap_or_default();
            std::mem::replace(&mut self.event_type, name)
        });
        let next = match spare_data.pop() {
            Some(spare) => spare,
            None => String::with_capacity(self.data.capacity().min(MAX_SPARE_CAPACITY)),
        };
        let data = std::mem::replace(&mut self.data, next);
        ready.push_back(Event {
            event,
            data,
            id,
            retry,
        });
        true
    }
}

/// One event as [`Outlines`] reads it: its type and its data, as the bytes
/// the stream sent (not decoded).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outline<'a> {
    /// The `event` field, empty when absent.
    pub event: &'a [u8],
    /// The `data` lines, joined with `\n`.
    pub data: &'a [u8],
}

impl Outline<'_> {
    /// Whether this is the `data: [DONE]` sentinel that ends an OpenAI stream.
    pub fn is_done(&self) -> bool {
        self.data == DONE.as_bytes()
    }

    /// Whether the data is empty or only whitespace (see [`Event::is_blank`]).
    pub fn is_blank(&self) -> bool {
        self.data.trim_ascii().is_empty()
    }

    /// The data decoded as [`Parser`] decodes it: invalid UTF-8 replaced
    /// with U+FFFD.
    pub fn text(&self) -> std::borrow::Cow<'_, str> {
        crate::utf8_lossy(self.data)
    }
}

/// Where a Responses stream's numbering stands. Every event of a Responses
/// stream carries a `sequence_number`, one more than the event before it;
/// an event the proxy adds to the stream (the error event of a stream
/// broken mid-way) takes the number after the highest one seen, so that a
/// client that orders or resumes by number reads it last.
///
/// ```
/// use llm_proxy_core::sse::SequenceNumbers;
///
/// let mut numbers = SequenceNumbers::default();
/// assert_eq!(numbers.next(), 0);
/// numbers.observe(br#"{"type":"response.created","sequence_number":0}"#);
/// numbers.observe(br#"{"type":"response.output_text.delta","sequence_number" : 7,"delta":"\"sequence_number\":99"}"#);
/// assert_eq!(numbers.next(), 8);
/// // The end of a longer key, not the key.
/// numbers.observe(br#"{"x\"sequence_number":99}"#);
/// assert_eq!(numbers.next(), 8);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SequenceNumbers {
    next: u64,
}

impl SequenceNumbers {
    /// Note the data of one of the stream's events (or any bytes holding
    /// whole events: a match is found by its key, not by a parse). A
    /// `"sequence_number"` whose first quote is escaped is the end of a
    /// longer string and skipped; one that is a key in an object the event
    /// carries (a tool's schema, say) counts too, and as the highest number
    /// seen counts, it can only move the next number on.
    pub fn observe(&mut self, data: &[u8]) {
        static KEY: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
            std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"sequence_number\""));
        for at in KEY.find_iter(data) {
            let escapes = data[..at].iter().rev().take_while(|b| **b == b'\\').count();
            if escapes % 2 == 1 {
                continue;
            }
            let rest = data[at + KEY.needle().len()..].trim_ascii_start();
            let Some(rest) = rest.strip_prefix(b":") else {
                continue;
            };
            let digits = rest.trim_ascii_start();
            let len = digits.iter().take_while(|b| b.is_ascii_digit()).count();
            // At most 19 digits: always within a `u64`; a longer number is
            // not one a stream counts to.
            if (1..=19).contains(&len) {
                let number = digits[..len]
                    .iter()
                    .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
                self.next = self.next.max(number.saturating_add(1));
            }
        }
    }

    /// The number the next event takes: one past the highest seen, 0 when
    /// none was.
    pub fn next(&self) -> u64 {
        self.next
    }
}

/// Reads an event stream for each event's [`Outline`], and nothing more:
/// no text is decoded, no `id` or `retry` kept, no event queued. For code
/// that watches a stream as it passes it on (did the last event come, is
/// each event a JSON object, which event holds the usage) and decodes an
/// event's text only when it reads it ([`Outline::text`]). Lines are split
/// exactly as [`Parser`] splits them; an event's size, for its limit, is
/// its type's and data's bytes as sent (the parser also counts its `id`,
/// and its data as decoded).
///
/// ```
/// use llm_proxy_core::sse::{Outlines, SseError};
///
/// let mut outlines = Outlines::new();
/// let mut seen = Vec::new();
/// outlines
///     .push(b"event: a\ndata: 1\n\ndata: [DO", |event| {
///         seen.push((event.event.to_vec(), event.data.to_vec()));
///         Ok::<_, SseError>(())
///     })
///     .unwrap();
/// assert_eq!(seen, [(b"a".to_vec(), b"1".to_vec())]);
/// assert!(outlines.has_partial());
/// outlines
///     .push(b"NE]\n\n", |event| {
///         assert!(event.is_done());
///         Ok::<_, SseError>(())
///     })
///     .unwrap();
/// ```
#[derive(Debug)]
pub struct Outlines {
    max_event_bytes: usize,
    lines: Lines,
    in_event: bool,
    event: Vec<u8>,
    /// Data lines of the current event, each followed by `\n`.
    data: Vec<u8>,
    /// Bytes pushed before the current chunk.
    pushed: u64,
    /// Just past the blank line that ended the last event (of any kind).
    boundary: u64,
    /// See [`Outlines::last_event_end`].
    last_event_end: Option<usize>,
}

impl Default for Outlines {
    fn default() -> Self {
        Self::new()
    }
}

impl Outlines {
    /// A reader that accepts events of up to [`DEFAULT_MAX_EVENT_BYTES`].
    pub fn new() -> Self {
        Self::with_max_event_bytes(DEFAULT_MAX_EVENT_BYTES)
    }

    /// A reader that fails with [`SseError::EventTooLarge`] once the event
    /// being read (its type and data plus the unfinished line) exceeds
    /// `limit` bytes.
    pub fn with_max_event_bytes(limit: usize) -> Self {
        Self {
            max_event_bytes: limit,
            lines: Lines::default(),
            in_event: false,
            event: Vec::new(),
            data: Vec::new(),
            pushed: 0,
            boundary: 0,
            last_event_end: None,
        }
    }

    /// Count the event being read in `budget` (see [`Parser::counted_in`]).
    pub fn counted_in(mut self, budget: Option<&BodyBudget>) -> Self {
        self.lines.count_in(budget, false);
        self
    }

    /// Count the event being read in `budget`, and fail with
    /// [`SseError::OverBudget`] past its limit (see [`Parser::bounded_by`]).
    pub fn bounded_by(mut self, budget: Option<&BodyBudget>) -> Self {
        self.lines.count_in(budget, true);
        self
    }

    /// The bytes pushed so far (the last push's included, whether it
    /// failed or not): the offset in the stream of the next chunk's first
    /// byte, as the spans of [`Outlines::push_spanned`] count.
    pub fn pushed(&self) -> u64 {
        self.pushed
    }

    /// Feeds the next bytes of the stream, calling `each` with every event
    /// they complete, in order. An error from `each` stops the read at that
    /// event and is returned; the rest of `chunk` is not read.
    ///
    /// On error the unfinished event and the rest of `chunk` are discarded;
    /// the stream is not trustworthy after that and should not be fed on.
    pub fn push<E: From<SseError>>(
        &mut self,
        chunk: &[u8],
        mut each: impl FnMut(Outline<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        self.push_spanned(chunk, |outline, _| each(outline))
    }

    /// [`Outlines::push`], with where each event lies in the stream
    /// (offsets from the first byte pushed), as
    /// [`Parser::next_event_with_span`] says it: from just past the blank
    /// line that ended the event before it (so with the comments, and the
    /// blank lines and events without data, between the two) to just past
    /// its own blank line.
    ///
    /// ```
    /// use llm_proxy_core::sse::{Outlines, SseError};
    ///
    /// let mut outlines = Outlines::new();
    /// let mut spans = Vec::new();
    /// for chunk in [&b"data: a\n\n: ping\n"[..], b"data: b\n\n"] {
    ///     outlines
    ///         .push_spanned(chunk, |_, span| {
    ///             spans.push(span);
    ///             Ok::<_, SseError>(())
    ///         })
    ///         .unwrap();
    /// }
    /// // The second with the comment before it.
    /// assert_eq!(spans, [0..9, 9..25]);
    /// ```
    pub fn push_spanned<E: From<SseError>>(
        &mut self,
        chunk: &[u8],
        mut each: impl FnMut(Outline<'_>, std::ops::Range<u64>) -> Result<(), E>,
    ) -> Result<(), E> {
        let limit = self.max_event_bytes;
        self.last_event_end = None;
        let pushed = self.pushed;
        self.pushed += chunk.len() as u64;
        let Self {
            lines,
            in_event,
            event,
            data,
            boundary,
            ..
        } = self;
        // The current event's type and data while each is one line of
        // `chunk`: borrowed from it, and copied into `event` / `data` only
        // when the event goes on past the chunk or has more data lines.
        let mut here_event: Option<&[u8]> = None;
        let mut here_data: Option<&[u8]> = None;
        let split = lines.split(chunk, |line, line_end| {
            let (name, value) = match field(line.bytes()) {
                Field::Blank => {
                    *in_event = false;
                    let end = pushed + line_end as u64;
                    let span = std::mem::replace(boundary, end)..end;
                    let event_type = here_event.take().unwrap_or(event);
                    let read = match here_data.take() {
                        Some(one) => each(
                            Outline {
                                event: event_type,
                                data: one,
                            },
                            span,
                        ),
                        None if data.is_empty() => Ok(()),
                        None => {
                            data.pop(); // the `\n` after the last data line
                            each(
                                Outline {
                                    event: event_type,
                                    data,
                                },
                                span,
                            )
                        }
                    };
                    event.clear();
                    data.clear();
                    if data.capacity() > MAX_SPARE_CAPACITY {
                        // One large event: not kept for the small ones after it.
                        *data = Vec::new();
                    }
                    if event.capacity() > MAX_SPARE_CAPACITY {
                        *event = Vec::new();
                    }
                    read?;
                    return Ok(true);
                }
                Field::Comment => return Ok(false),
                Field::Named(name, value) => (name, value),
            };
            *in_event = true;
            match name {
                b"data" => match line.in_chunk(value) {
                    Some(value) if here_data.is_none() && data.is_empty() => {
                        here_data = Some(value)
                    }
                    _ => {
                        if let Some(first) = here_data.take() {
                            data.extend_from_slice(first);
                            data.push(b'\n');
                        }
                        data.extend_from_slice(value);
                        data.push(b'\n');
                    }
                },
                b"event" => {
                    event.clear();
                    here_event = line.in_chunk(value);
                    if here_event.is_none() {
                        event.extend_from_slice(value);
                    }
                }
                _ => {}
            }
            let event_len = here_event.map_or(event.len(), <[u8]>::len);
            let data_len = here_data.map_or(data.len(), |one| one.len() + 1);
            if event_len + data_len > limit {
                return Err(E::from(SseError::EventTooLarge { limit }));
            }
            Ok(false)
        });
        let (last_event_end, tail) = match split {
            Ok(split) => split,
            Err(e) => {
                self.reset_event();
                return Err(e);
            }
        };
        // The event goes on in the next chunk: keep what this one lent.
        if let Some(event_type) = here_event {
            self.event.extend_from_slice(event_type);
        }
        if let Some(one) = here_data {
            self.data.extend_from_slice(one);
            self.data.push(b'\n');
        }
        if let Err(e) = self
            .lines
            .keep(tail, self.event.len() + self.data.len(), limit)
        {
            self.reset_event();
            return Err(E::from(e));
        }
        self.last_event_end = last_event_end;
        Ok(())
    }

    /// Whether bytes of an unfinished line or event are buffered (see
    /// [`Parser::has_partial`]).
    pub fn has_partial(&self) -> bool {
        self.lines.buffered() > 0 || self.in_event
    }

    /// Where in the chunk given to the last push the last event ended (see
    /// [`Parser::last_event_end`]); `None` when none did, or the push
    /// failed.
    pub fn last_event_end(&self) -> Option<usize> {
        self.last_event_end
    }

    fn reset_event(&mut self) {
        self.lines.clear();
        self.in_event = false;
        self.event.clear();
        self.data.clear();
        if self.event.capacity() > MAX_SPARE_CAPACITY {
            self.event = Vec::new();
        }
        if self.data.capacity() > MAX_SPARE_CAPACITY {
            self.data = Vec::new();
        }
    }
}

/// The line splitting of an event stream, the part [`Parser`] and
/// [`Outlines`] share: lines end with `\r\n`, `\n` or `\r`, possibly split
/// across chunks; the stream's first line may start with a BOM.
#[derive(Debug)]
struct Lines {
    /// The bytes of an unfinished line, kept across chunks.
    line: Vec<u8>,
    /// The last chunk ended in `\r`: a `\n` starting the next one belongs to
    /// the same line break.
    pending_cr: bool,
    /// No line has been completed yet, so a BOM may still start the stream.
    at_stream_start: bool,
    /// What the held event and line take from a budget, if one counts them.
    claim: Option<Claim>,
    /// The claim is refused past the budget's limit (else only counted).
    bounded: bool,
}

impl Default for Lines {
    fn default() -> Self {
        Lines {
            line: Vec::new(),
            pending_cr: false,
            at_stream_start: true,
            claim: None,
            bounded: false,
        }
    }
}

impl Lines {
    /// Hands each line that `chunk` completes to `each`, without its line
    /// break (and the stream's BOM), with where in `chunk` it ended (past
    /// its break); `each` says whether the line ended an event. Returns where in `chunk` the last event ended, and the
    /// unfinished last line, for the caller to [`Lines::keep`] once it has
    /// checked its size.
    fn split<'c, E>(
        &mut self,
        mut chunk: &'c [u8],
        mut each: impl FnMut(Line<'c, '_>, usize) -> Result<bool, E>,
    ) -> Result<(Option<usize>, &'c [u8]), E> {
        let len = chunk.len();
        let mut last_event_end = None;
        if self.pending_cr && !chunk.is_empty() {
            self.pending_cr = false;
            if let Some(rest) = chunk.strip_prefix(b"\n") {
                chunk = rest;
            }
        }
        while let Some(end) = memchr::memchr2(b'\n', b'\r', chunk) {
            let (line, rest) = chunk.split_at(end);
            chunk = match rest {
                [b'\r', b'\n', rest @ ..] => rest,
                [b'\r'] => {
                    self.pending_cr = true;
                    &[]
                }
                [_, rest @ ..] => rest,
                [] => &[],
            };
            let at_start = std::mem::replace(&mut self.at_stream_start, false);
            fn strip(line: &[u8], at_start: bool) -> &[u8] {
                if at_start {
                    line.strip_prefix(BOM).unwrap_or(line)
                } else {
                    line
                }
            }
            let line_end = len - chunk.len();
            let ends_event = if self.line.is_empty() {
                each(Line::InChunk(strip(line, at_start)), line_end)?
            } else {
                let mut buffered = std::mem::take(&mut self.line);
                buffered.extend_from_slice(line);
                let result = each(Line::Joined(strip(&buffered, at_start)), line_end);
                buffered.clear();
                if buffered.capacity() <= MAX_SPARE_CAPACITY {
                    // One long line's buffer is not kept for the short ones.
                    self.line = buffered;
                }
                result?
            };
            if ends_event {
                last_event_end = Some(line_end);
            }
        }
        Ok((last_event_end, chunk))
    }

    /// Count what is held in `budget`'s pool for answers; `bounded`: refuse
    /// past its limit.
    fn count_in(&mut self, budget: Option<&BodyBudget>, bounded: bool) {
        self.claim = budget.map(|b| b.claim_in(Pool::Answers));
        self.bounded = bounded;
    }

    /// Keep the start of a line that the next chunk finishes, unless it
    /// would take the event past `limit` with the `held` bytes of its fields
    /// read so far. The held bytes (`held` and the kept line) are counted
    /// in the budget, if any.
    fn keep(&mut self, tail: &[u8], held: usize, limit: usize) -> Result<(), SseError> {
        let total = self.line.len() + held + tail.len();
        if total > limit {
            return Err(SseError::EventTooLarge { limit });
        }
        if let Some(claim) = &mut self.claim {
            if !self.bounded {
                claim.count(total);
            } else if total <= claim.held() {
                claim.shrink_to(total);
            } else if !claim.hold(total) {
                return Err(SseError::OverBudget {
                    limit: claim.limit(),
                });
            }
        }
        self.line.extend_from_slice(tail);
        Ok(())
    }

    fn buffered(&self) -> usize {
        self.line.len()
    }

    /// Drops the unfinished line, and gives back what the event held.
    fn clear(&mut self) {
        self.line.clear();
        if self.line.capacity() > MAX_SPARE_CAPACITY {
            self.line = Vec::new();
        }
        if let Some(claim) = &mut self.claim {
            claim.shrink_to(0);
        }
    }

    /// A new stream follows.
    fn restart(&mut self) {
        self.pending_cr = false;
        self.at_stream_start = true;
    }
}

/// A line as [`Lines::split`] hands it on.
#[derive(Clone, Copy)]
enum Line<'c, 'b> {
    /// The line lies whole in the chunk being split: a borrow of it.
    InChunk(&'c [u8]),
    /// The line began in an earlier chunk: joined in the line buffer.
    Joined(&'b [u8]),
}

impl<'c> Line<'c, '_> {
    fn bytes(&self) -> &[u8] {
        match *self {
            Line::InChunk(line) | Line::Joined(line) => line,
        }
    }

    /// `tail`, a tail of this line (a field's value), as a borrow of the
    /// chunk when the line lies in it.
    fn in_chunk(&self, tail: &[u8]) -> Option<&'c [u8]> {
        match *self {
            Line::InChunk(line) => {
                debug_assert!(line.ends_with(tail));
                Some(&line[line.len() - tail.len()..])
            }
            Line::Joined(_) => None,
        }
    }
}

/// What one line of an event stream is.
enum Field<'l> {
    /// The blank line that ends an event.
    Blank,
    /// A comment (`:` first).
    Comment,
    /// A field: its name and value (the value's one leading space dropped).
    Named(&'l [u8], &'l [u8]),
}

fn field(line: &[u8]) -> Field<'_> {
    match memchr::memchr(b':', line) {
        None if line.is_empty() => Field::Blank,
        Some(0) => Field::Comment,
        Some(colon) => {
            let value = &line[colon + 1..];
            Field::Named(&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
        }
        None => Field::Named(line, &[]),
    }
}

/// Encodes an event: `event:`, `id:` and `retry:` fields when set, one
/// `data:` line per line of `data`, then a blank line.
///
/// Line breaks (`\r\n`, `\r`, `\n`) in `data` become separate `data:` lines,
/// so they parse back as `\n`. Line breaks in `event` and `id` would end the
/// field early and are left out.
pub fn encode(event: &Event) -> Bytes {
    let mut out = Vec::with_capacity(event.data.len() + 32);
    if let Some(name) = &event.event {
        write_field(&mut out, "event", name);
    }
    if let Some(id) = &event.id {
        write_field(&mut out, "id", id);
    }
    if let Some(retry) = event.retry {
        write_field(&mut out, "retry", &retry.to_string());
    }
    write_data(&mut out, &event.data);
    out.push(b'\n');
    Bytes::from(out)
}

/// Encodes `data: {data}\n\n`, one `data:` line per line of `data`.
pub fn encode_data(data: &str) -> Bytes {
    let mut out = Vec::with_capacity(data.len() + 8);
    write_data(&mut out, data);
    out.push(b'\n');
    Bytes::from(out)
}

fn write_field(out: &mut Vec<u8>, name: &str, value: &str) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    for piece in value.split(['\r', '\n']) {
        out.extend_from_slice(piece.as_bytes());
    }
    out.push(b'\n');
}

fn write_data(out: &mut Vec<u8>, data: &str) {
    let mut rest = data.as_bytes();
    loop {
        let end = rest.iter().position(|&b| b == b'\n' || b == b'\r');
        let line = end.map_or(rest, |end| &rest[..end]);
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line);
        out.push(b'\n');
        rest = match end.map(|end| &rest[end..]) {
            None => break,
            Some([b'\r', b'\n', tail @ ..]) | Some([_, tail @ ..]) => tail,
            Some([]) => break,
        };
    }
}

/// Appends `bytes` decoded as UTF-8, invalid sequences replaced with
/// U+FFFD (as the spec decodes a stream; [`crate::utf8_lossy`]).
fn push_lossy(out: &mut String, bytes: &[u8]) {
    out.push_str(&crate::utf8_lossy(bytes));
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test should panic on unexpected input
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SAMPLE: &[u8] = "\u{FEFF}: keep-alive\r\n\
        event: delta\r\n\
        id: 1\r\n\
        data: {\"text\":\"h\u{e9}llo \u{1F600}\"}\r\n\
        \r\n\
        data: line one\rdata: line two\r\r\
        retry: 1500\n\
        unknown: field\n\
        data\n\
        data:  two spaces\n\
        \n\
        id\n\
        event: no-data\n\
        \n\
        data: [DONE]\n\n"
        .as_bytes();

    fn sample_events() -> Vec<Event> {
        vec![
            Event {
                event: Some("delta".into()),
                data: "{\"text\":\"h\u{e9}llo \u{1F600}\"}".into(),
                id: Some("1".into()),
                retry: None,
            },
            Event {
                data: "line one\nline two".into(),
                ..Event::default()
            },
            Event {
                data: "\n two spaces".into(),
                retry: Some(1500),
                ..Event::default()
            },
            Event {
                data: DONE.into(),
                ..Event::default()
            },
        ]
    }

    fn parse_chunks<'a>(
        parser: &mut Parser,
        chunks: impl IntoIterator<Item = &'a [u8]>,
    ) -> Vec<Event> {
        // Every other event is lent (`next_event_ref`) rather than given
        // away: the lent ones' buffers are reused for the events after them,
        // which must come out the same either way.
        let mut events: Vec<Event> = Vec::new();
        for chunk in chunks {
            parser.push(chunk).unwrap();
            loop {
                let event = if events.len() % 2 == 0 {
                    parser.next_event()
                } else {
                    parser.next_event_ref().cloned()
                };
                match event {
                    Some(event) => events.push(event),
                    None => break,
                }
            }
        }
        events
    }

    fn parse_all(chunks: &[&[u8]]) -> Vec<Event> {
        parse_chunks(&mut Parser::new(), chunks.iter().copied())
    }

    #[test]
    fn whole_sample() {
        assert_eq!(parse_all(&[SAMPLE]), sample_events());
    }

    #[test]
    fn split_at_every_byte_position() {
        for at in 0..=SAMPLE.len() {
            let (a, b) = SAMPLE.split_at(at);
            assert_eq!(parse_all(&[a, b]), sample_events(), "split at {at}");
        }
    }

    #[test]
    fn split_at_every_pair_of_positions() {
        for i in 0..=SAMPLE.len() {
            for j in i..=SAMPLE.len() {
                let chunks = [&SAMPLE[..i], &SAMPLE[i..j], &SAMPLE[j..]];
                assert_eq!(parse_all(&chunks), sample_events(), "split at {i}, {j}");
            }
        }
    }

    #[test]
    fn byte_by_byte() {
        let mut parser = Parser::new();
        assert_eq!(parse_chunks(&mut parser, SAMPLE.chunks(1)), sample_events());
        assert!(!parser.has_partial());
        assert_eq!(parser.last_event_id(), "");
        assert_eq!(parser.reconnection_time(), Some(1500));
    }

    #[test]
    fn line_endings() {
        for ending in ["\n", "\r", "\r\n"] {
            let stream = format!("data: a{ending}data: b{ending}{ending}data: c{ending}{ending}");
            let events = parse_all(&[stream.as_bytes()]);
            let data: Vec<_> = events.iter().map(|e| e.data.as_str()).collect();
            assert_eq!(data, ["a\nb", "c"], "ending {ending:?}");
        }
    }

    #[test]
    fn cr_at_chunk_end_then_lf_is_one_line_break() {
        // With an extra empty line this would dispatch "a" on its own.
        let events = parse_all(&[b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"]);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].data, "a\nb");
    }

    #[test]
    fn empty_data_is_an_event_that_is_blank() {
        let events = parse_all(&[b"data: \n\ndata:\n\ndata:  \ndata:\n\ndata: x\n\n"]);
        let data: Vec<_> = events.iter().map(|e| e.data.as_str()).collect();
        assert_eq!(data, ["", "", " \n", "x"]);
        let blank: Vec<_> = events.iter().map(Event::is_blank).collect();
        assert_eq!(blank, [true, true, true, false]);
    }

    #[test]
    fn comments_are_ignored() {
        let events = parse_all(&[b": ping\n\n:\ndata: x\n: in between\n\n"]);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].data, "x");
    }

    #[test]
    fn multi_line_data_round_trips() {
        let event = Event {
            event: Some("message".into()),
            data: "one\n\ntwo\n".into(),
            id: Some("7".into()),
            retry: Some(10),
        };
        let wire = encode(&event);
        assert_eq!(
            &wire[..],
            b"event: message\nid: 7\nretry: 10\ndata: one\ndata: \ndata: two\ndata: \n\n"
        );
        assert_eq!(parse_all(&[&wire]), [event]);
    }

    #[test]
    fn encode_data_normalises_line_breaks() {
        assert_eq!(&encode_data("x")[..], b"data: x\n\n");
        assert_eq!(&encode_data("")[..], b"data: \n\n");
        assert_eq!(
            &encode_data("a\r\nb\rc")[..],
            b"data: a\ndata: b\ndata: c\n\n"
        );
        let events = parse_all(&[&encode_data("a\r\nb\rc")]);
        assert_eq!(events[0].data, "a\nb\nc");
    }

    #[test]
    fn encode_drops_line_breaks_in_fields() {
        let event = Event {
            event: Some("a\nretry: 5".into()),
            id: Some("1\r2".into()),
            ..Event::default()
        };
        assert_eq!(&encode(&event)[..], b"event: aretry: 5\nid: 12\ndata: \n\n");
    }

    #[test]
    fn done_sentinel() {
        let events = parse_all(&[b"data: {}\n\ndata: [DONE]\n\n"]);
        assert!(!events[0].is_done());
        assert!(events[1].is_done());
        assert!(
            !Event {
                data: "[DONE] ".into(),
                ..Event::default()
            }
            .is_done()
        );
    }

    #[test]
    fn bom_only_at_stream_start() {
        let events = parse_all(&[
            b"\xEF\xBB",
            b"\xBFdata: a\n\n\xEF\xBB\xBFdata: b\n\ndata: c\n\n",
        ]);
        // The second BOM is not at the stream start: it makes an unknown field.
        let data: Vec<_> = events.iter().map(|e| e.data.as_str()).collect();
        assert_eq!(data, ["a", "c"]);
    }

    #[test]
    fn split_multibyte_char_and_invalid_utf8() {
        let events = parse_all(&[b"data: \xF0\x9F", b"\x98\x80 \xFF\n\n"]);
        assert_eq!(events[0].data, "\u{1F600} \u{FFFD}");
    }

    #[test]
    fn id_and_retry_rules() {
        let events = parse_all(&[b"id: a\0b\nretry: 1x\nretry:\ndata: x\n\nid\ndata: y\n\n"]);
        assert_eq!(events[0].id, None);
        assert_eq!(events[0].retry, None);
        assert_eq!(events[1].id.as_deref(), Some(""));
    }

    #[test]
    fn empty_data_line_dispatches_but_no_data_does_not() {
        let events = parse_all(&[b"event: a\n\ndata\n\nevent: b\nid: 3\n\n"]);
        assert_eq!(events, [Event::default()]);
    }

    #[test]
    fn held_events_count_against_a_shared_budget_until_they_end() {
        let budget = BodyBudget::new(100);
        // `a` only counts what it holds; `b` is bounded by what all hold.
        let mut a = Parser::new().counted_in(Some(&budget));
        let mut b = Outlines::new().bounded_by(Some(&budget));
        let no_events = |_: Outline<'_>| Ok::<_, SseError>(());
        // Whole events in one chunk are never held.
        a.push(b"data: 1\n\n").unwrap();
        assert_eq!(budget.answers_in_use(), 0);
        assert_eq!(a.next_event().unwrap().data, "1");
        // An unfinished line, then an event's fields, are held.
        a.push(&[b'x'; 60]).unwrap();
        assert_eq!(budget.answers_in_use(), 60);
        b.push(b"data: 0123456789\n", no_events).unwrap();
        assert_eq!(budget.answers_in_use(), 60 + 11);
        let err = b.push(&[b'y'; 30], no_events).unwrap_err();
        assert!(matches!(err, SseError::OverBudget { limit: 100 }), "{err}");
        // The failed event is dropped, and what it held given back.
        assert_eq!(budget.answers_in_use(), 60);
        assert!(!b.has_partial());
        // The event's end gives back what it held.
        a.push(b"\n\n").unwrap();
        assert_eq!(a.next_event(), None, "a field without data");
        assert_eq!(budget.answers_in_use(), 0);
        let mut b = Outlines::new().bounded_by(Some(&budget));
        b.push(&[b'y'; 90], no_events).unwrap();
        assert_eq!(budget.answers_in_use(), 90);
        // So does the end of the stream, or the parser's drop.
        drop(b);
        assert_eq!(budget.answers_in_use(), 0);
        a.push(b"data: 12").unwrap();
        assert_eq!(budget.answers_in_use(), 8);
        a.finish();
        assert_eq!(budget.answers_in_use(), 0);
        // Counting never refuses; what it holds, the bounded parser sees.
        a.push(&[b'z'; 150]).unwrap();
        assert_eq!(budget.answers_in_use(), 150);
        let mut b = Outlines::new().bounded_by(Some(&budget));
        let err = b.push(b"data: x", no_events).unwrap_err();
        assert!(matches!(err, SseError::OverBudget { limit: 100 }), "{err}");
        // Request bodies are a pool of their own.
        assert_eq!(budget.in_use(), 0);
    }

    #[test]
    fn a_large_event_leaves_no_large_buffer_behind() {
        let big = vec![b'x'; 1 << 20];
        let mut parser = Parser::new();
        for chunk in [
            &b"id: "[..],
            &big,
            b"\ndata: ",
            &big,
            b"\n",
            b"data: ",
            &big,
            b"\n\n",
        ] {
            parser.push(chunk).unwrap();
        }
        assert_eq!(parser.next_event().unwrap().data.len(), (2 << 20) + 1);
        assert!(parser.lines.line.capacity() <= MAX_SPARE_CAPACITY);
        assert!(parser.event.data.capacity() <= MAX_SPARE_CAPACITY);
        assert_eq!(parser.last_event_id(), "", "too long to keep");
        assert!(parser.event.last_event_id.capacity() <= MAX_LAST_EVENT_ID);
        // An event cut by an error leaves none either.
        let mut parser = Parser::with_max_event_bytes(3 << 20);
        parser.push(b"data: ").unwrap();
        parser.push(&big).unwrap();
        parser.push(b"\ndata: ").unwrap();
        parser.push(&big).unwrap();
        parser.push(b"\ndata: ").unwrap();
        assert!(parser.push(&big).is_err(), "3 MiB and more");
        assert!(parser.lines.line.capacity() <= MAX_SPARE_CAPACITY);
        assert!(parser.event.data.capacity() <= MAX_SPARE_CAPACITY);

        let mut outlines = Outlines::new();
        let mut seen = 0;
        for chunk in [&b"event: "[..], &big, b"\ndata: ", &big, b"\n\n"] {
            outlines
                .push(chunk, |event| {
                    seen += event.data.len() + event.event.len();
                    Ok::<_, SseError>(())
                })
                .unwrap();
        }
        assert_eq!(seen, 2 << 20);
        assert!(outlines.lines.line.capacity() <= MAX_SPARE_CAPACITY);
        assert!(outlines.event.capacity() <= MAX_SPARE_CAPACITY);
        assert!(outlines.data.capacity() <= MAX_SPARE_CAPACITY);
        // Nor one cut by an error.
        let mut outlines = Outlines::with_max_event_bytes(3 << 20);
        let nothing = |_: Outline<'_>| Ok::<_, SseError>(());
        for chunk in [&b"event: "[..], &big, b"\ndata: ", &big, b"\ndata: "] {
            outlines.push(chunk, nothing).unwrap();
        }
        assert!(outlines.push(&big, nothing).is_err(), "3 MiB and more");
        assert!(outlines.lines.line.capacity() <= MAX_SPARE_CAPACITY);
        assert!(outlines.event.capacity() <= MAX_SPARE_CAPACITY);
        assert!(outlines.data.capacity() <= MAX_SPARE_CAPACITY);
    }

    #[test]
    fn too_large_event() {
        let mut parser = Parser::with_max_event_bytes(16);
        assert!(parser.push(b"data: 0123456789\n").is_ok());
        let err = parser.push(b"data: 0123456789\n").unwrap_err();
        assert!(matches!(err, SseError::EventTooLarge { limit: 16 }));
        assert!(err.to_string().contains("16 bytes"));

        // An unfinished line counts too, even when it comes in small pieces.
        let mut parser = Parser::with_max_event_bytes(16);
        let result = (0..20).try_for_each(|_| parser.push(b"d"));
        assert!(matches!(result, Err(SseError::EventTooLarge { limit: 16 })));

        // Dispatched events do not count against the limit.
        let mut parser = Parser::with_max_event_bytes(16);
        for _ in 0..10 {
            parser.push(b"data: 0123456789\n\n").unwrap();
        }
        assert_eq!(std::iter::from_fn(|| parser.next_event()).count(), 10);
    }

    #[test]
    fn last_event_end_is_past_the_blank_line() {
        let mut parser = Parser::new();
        parser
            .push(b"data: a\n\ndata: b\r\n\r\n: c\ndata: d")
            .unwrap();
        assert_eq!(parser.last_event_end(), Some(20));
        parser.push(b"\r").unwrap();
        assert_eq!(parser.last_event_end(), None);
        // The `\n` of a `\r\n` cut in two is no line of its own.
        parser.push(b"\n\r").unwrap();
        assert_eq!(parser.last_event_end(), Some(2));
        parser.push(b"\nevent: e\n\n").unwrap();
        assert_eq!(parser.last_event_end(), Some(11), "an event without data");
        parser.push(b": only a comment\n\n").unwrap();
        assert_eq!(parser.last_event_end(), Some(18));
    }

    #[test]
    fn has_partial_and_finish() {
        let mut parser = Parser::new();
        assert!(!parser.has_partial());
        parser.push(b": keep-alive\n").unwrap();
        assert!(!parser.has_partial());
        parser.push(b"data: x").unwrap();
        assert!(parser.has_partial());
        parser.push(b"\n").unwrap();
        assert!(parser.has_partial());
        parser.push(b"\r\n").unwrap();
        assert!(!parser.has_partial());
        parser.push(b"data: cut off").unwrap();
        assert!(parser.finish().is_none());
        assert!(!parser.has_partial());
        assert_eq!(parser.next_event().unwrap().data, "x");
        assert!(parser.next_event().is_none());

        // After finish the parser reads a fresh stream, BOM included.
        parser.push(b"\xEF\xBB\xBFdata: y\n\n").unwrap();
        assert_eq!(parser.next_event().unwrap().data, "y");
    }

    #[test]
    fn lent_events_leave_nothing_behind_in_the_next() {
        let mut parser = Parser::new();
        parser
            .push(b"event: long-name\ndata: a long first event\n\ndata: b\n\nevent: c\ndata: c\n\n")
            .unwrap();
        let mut seen = Vec::new();
        while let Some(event) = parser.next_event_ref() {
            seen.push(event.clone());
        }
        assert_eq!(
            seen,
            [
                Event {
                    event: Some("long-name".into()),
                    data: "a long first event".into(),
                    ..Event::default()
                },
                Event {
                    data: "b".into(),
                    ..Event::default()
                },
                Event {
                    event: Some("c".into()),
                    data: "c".into(),
                    ..Event::default()
                },
            ]
        );
        // The buffers came back and serve the next events, cleared.
        parser.push(b"data: d\n\nevent: e\ndata: e\n\n").unwrap();
        assert!(!parser.spare_data.is_empty());
        assert_eq!(
            parser
                .next_event_ref()
                .map(|e| (e.event.clone(), e.data.as_str())),
            Some((None, "d"))
        );
        assert_eq!(
            parser
                .next_event_ref()
                .map(|e| (e.event.as_deref(), e.data.as_str())),
            Some((Some("e"), "e"))
        );
        assert!(parser.next_event_ref().is_none());
    }

    fn event_strategy() -> impl Strategy<Value = Event> {
        (
            proptest::option::of("[^\r\n]{1,12}"),
            "[^\r]{0,40}",
            proptest::option::of("[^\r\n\0]{0,12}"),
            proptest::option::of(any::<u64>()),
        )
            .prop_map(|(event, data, id, retry)| Event {
                event,
                data,
                id,
                retry,
            })
    }

    /// An outline as the parser would give its event (no id or retry).
    fn as_event(outline: Outline<'_>) -> Event {
        Event {
            event: (!outline.event.is_empty())
                .then(|| String::from_utf8_lossy(outline.event).into_owned()),
            data: outline.text().into_owned(),
            ..Event::default()
        }
    }

    /// `chunks` read with `limit` by `Parser` and by `Outlines`: the events
    /// each delivered, and whether each refused (each stops at its refusal).
    fn read_both_within<'c>(
        limit: usize,
        chunks: impl IntoIterator<Item = &'c [u8]> + Clone,
    ) -> ((Vec<Event>, bool), (Vec<Event>, bool)) {
        let mut parser = Parser::with_max_event_bytes(limit);
        let mut parsed = Vec::new();
        let mut parser_refused = false;
        for chunk in chunks.clone() {
            let pushed = parser.push(chunk);
            parsed.extend(std::iter::from_fn(|| parser.next_event()));
            if pushed.is_err() {
                parser_refused = true;
                break;
            }
        }
        let mut outlines = Outlines::with_max_event_bytes(limit);
        let mut outlined = Vec::new();
        let mut outlines_refused = false;
        for chunk in chunks {
            let pushed = outlines.push(chunk, |outline| {
                outlined.push(as_event(outline));
                Ok::<_, SseError>(())
            });
            if pushed.is_err() {
                outlines_refused = true;
                break;
            }
        }
        ((parsed, parser_refused), (outlined, outlines_refused))
    }

    /// What [`Outlines`] reads from `chunks`, as [`Parser`]'s events (type
    /// and data, decoded as the parser decodes them), and whether it ends
    /// with a partial event.
    fn outline_chunks<'a>(chunks: impl IntoIterator<Item = &'a [u8]>) -> (Vec<Event>, bool) {
        let mut outlines = Outlines::new();
        let mut events = Vec::new();
        for chunk in chunks {
            outlines
                .push(chunk, |outline| {
                    events.push(as_event(outline));
                    Ok::<_, SseError>(())
                })
                .unwrap();
        }
        (events, outlines.has_partial())
    }

    fn without_ids(events: Vec<Event>) -> Vec<Event> {
        events
            .into_iter()
            .map(|e| Event {
                id: None,
                retry: None,
                ..e
            })
            .collect()
    }

    #[test]
    fn outlines_read_the_sample_as_the_parser_does() {
        for size in 1..SAMPLE.len() {
            let (events, partial) = outline_chunks(SAMPLE.chunks(size));
            assert_eq!(events, without_ids(sample_events()), "chunks of {size}");
            assert!(!partial);
        }
    }

    #[test]
    fn outlines_stop_where_the_reader_says_and_at_the_limit() {
        let mut outlines = Outlines::new();
        let mut seen = 0;
        let stopped = outlines.push(b"data: 1\n\ndata: 2\n\ndata: 3\n\n", |outline| {
            seen += 1;
            if outline.data == b"2" {
                return Err(SseError::EventTooLarge { limit: 0 });
            }
            Ok(())
        });
        assert!(stopped.is_err());
        assert_eq!(seen, 2, "the third event is not read");
        assert!(!outlines.has_partial());

        let mut small = Outlines::with_max_event_bytes(8);
        let ok = |_: Outline<'_>| Ok::<_, SseError>(());
        assert!(small.push(b"data: 1234\n", ok).is_ok());
        assert!(matches!(
            small.push(b"data: 56789\n", ok),
            Err(SseError::EventTooLarge { limit: 8 })
        ));
        assert!(!small.has_partial(), "the event is dropped");
        assert!(small.push(b"data: 12", ok).is_ok());
        assert!(small.push(b"3", ok).is_err(), "an unfinished line counts");
    }

    #[test]
    fn a_refused_push_says_no_event_ended_in_it() {
        let mut outlines = Outlines::with_max_event_bytes(8);
        let ok = |_: Outline<'_>| Ok::<_, SseError>(());
        assert!(outlines.push(b"data: a\n\ndata: b", ok).is_ok());
        assert_eq!(outlines.last_event_end(), Some(9));
        // An event ends in the chunk, but the line after it is too long.
        assert!(outlines.push(b"\n\ndata: 0123456789", ok).is_err());
        assert_eq!(outlines.last_event_end(), None);
    }

    #[test]
    fn outlines_do_not_keep_a_large_events_buffer() {
        let mut outlines = Outlines::new();
        // Two data lines: an event of one line in one chunk is lent from
        // the chunk and never reaches the buffer.
        let half = "x".repeat(MAX_SPARE_CAPACITY / 2);
        let large = format!("data: {half}\ndata: {half}\n\n");
        let mut seen = Vec::new();
        for chunk in [large.as_bytes(), b"data: small\n\n"] {
            outlines
                .push(chunk, |e| {
                    seen.push(e.data.len());
                    Ok::<_, SseError>(())
                })
                .unwrap();
            assert!(outlines.data.capacity() <= MAX_SPARE_CAPACITY);
        }
        assert_eq!(seen, [MAX_SPARE_CAPACITY + 1, 5]);
    }

    /// Events at the size limit, cut at every point, with every limit
    /// around their size: `Outlines` delivers and refuses as `Parser` does,
    /// whether a field is lent from the chunk or kept across chunks.
    #[test]
    fn outlines_refuse_at_the_parsers_limit_wherever_the_stream_is_cut() {
        let samples: [&[u8]; 4] = [
            b"event: abc\ndata: x\n\n",
            b"data: 12\ndata: 345\n\nevent: e\n\n",
            b"event: a\nevent: bcd\ndata:\n\ndata: [DONE]\n\n",
            b"\xEF\xBB\xBFdata: ab\r\nevent: zz\r\n\r\n",
        ];
        for wire in samples {
            for limit in 0..=wire.len() {
                for cut in 0..=wire.len() {
                    let (a, b) = wire.split_at(cut);
                    let ((parsed, parser_refused), (outlined, outlines_refused)) =
                        read_both_within(limit, [a, b]);
                    let case = format!(
                        "{:?} limit {limit} cut {cut}",
                        String::from_utf8_lossy(wire)
                    );
                    assert_eq!(outlines_refused, parser_refused, "{case}");
                    assert_eq!(outlined, without_ids(parsed), "{case}");
                }
            }
        }
    }

    /// Stream-like bytes: field names, separators, line breaks of every kind,
    /// a BOM, and bytes that are not UTF-8.
    fn wire_strategy() -> impl Strategy<Value = Vec<u8>> {
        let piece = prop_oneof![
            Just(b"id: 7".to_vec()),
            Just(vec![0xff, 0xc3]),
            valid_piece_strategy(),
        ];
        proptest::collection::vec(piece, 0..40).prop_map(|pieces| pieces.concat())
    }

    /// Pieces of a stream in which `Parser` and `Outlines` hold the same
    /// bytes of an event: no `id` (which only the parser keeps) and valid
    /// UTF-8 (which it keeps as sent).
    fn valid_piece_strategy() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            Just(b"data:".to_vec()),
            Just(b"data: ".to_vec()),
            Just(b"event: ".to_vec()),
            Just(b"retry: 10".to_vec()),
            Just(b":".to_vec()),
            Just(b"\n".to_vec()),
            Just(b"\r".to_vec()),
            Just(b"\r\n".to_vec()),
            Just(b"\n\n".to_vec()),
            Just(BOM.to_vec()),
            Just(b"[DONE]".to_vec()),
            "[a-z{}\" ]{1,6}".prop_map(String::into_bytes),
        ]
    }

    /// Splits `wire` into chunks of the given sizes, in turn.
    fn cut<'w>(wire: &'w [u8], sizes: &[usize]) -> Vec<&'w [u8]> {
        let mut chunks = Vec::new();
        let mut rest = wire;
        for size in sizes.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (chunk, tail) = rest.split_at((*size).min(rest.len()));
            chunks.push(chunk);
            rest = tail;
        }
        chunks
    }

    proptest! {
        #[test]
        fn encode_then_parse_in_any_chunks(
            events in proptest::collection::vec(event_strategy(), 0..8),
            sizes in proptest::collection::vec(1usize..24, 1..16),
        ) {
            let wire: Vec<u8> = events.iter().flat_map(|e| encode(e).to_vec()).collect();
            let mut parser = Parser::new();
            prop_assert_eq!(parse_chunks(&mut parser, cut(&wire, &sizes)), events);
            prop_assert!(!parser.has_partial());
        }

        #[test]
        fn outlines_agree_with_the_parser_on_any_bytes_in_any_chunks(
            wire in wire_strategy(),
            sizes in proptest::collection::vec(1usize..24, 1..16),
        ) {
            let chunks = cut(&wire, &sizes);
            let mut parser = Parser::new();
            let parsed = without_ids(parse_chunks(&mut parser, chunks.iter().copied()));
            let (outlined, partial) = outline_chunks(chunks.iter().copied());
            prop_assert_eq!(outlined, parsed);
            prop_assert_eq!(partial, parser.has_partial());
        }

        /// Each event's span, and where in each chunk the last event
        /// ended, are the parser's.
        #[test]
        fn outlines_place_events_where_the_parser_does(
            wire in wire_strategy(),
            sizes in proptest::collection::vec(1usize..24, 1..16),
        ) {
            let mut parser = Parser::new().with_spans();
            let mut outlines = Outlines::new();
            for chunk in cut(&wire, &sizes) {
                parser.push(chunk).unwrap();
                let parsed: Vec<_> = std::iter::from_fn(|| parser.next_event_with_span())
                    .map(|(event, span)| (Event { id: None, retry: None, ..event }, span))
                    .collect();
                let mut outlined = Vec::new();
                outlines
                    .push_spanned(chunk, |outline, span| {
                        outlined.push((as_event(outline), span));
                        Ok::<_, SseError>(())
                    })
                    .unwrap();
                prop_assert_eq!(outlined, parsed);
                prop_assert_eq!(outlines.last_event_end(), parser.last_event_end());
            }
        }

        /// Events borrowed from a chunk and events copied across chunks
        /// count alike against the size limit: the same events come out
        /// before the same refusal as from the parser.
        #[test]
        fn outlines_refuse_a_large_event_where_the_parser_does(
            pieces in proptest::collection::vec(valid_piece_strategy(), 0..40),
            sizes in proptest::collection::vec(1usize..24, 1..16),
            limit in 0usize..40,
        ) {
            let wire = pieces.concat();
            let chunks = cut(&wire, &sizes);
            let ((parsed, parser_refused), (outlined, outlines_refused)) =
                read_both_within(limit, chunks.iter().copied());
            prop_assert_eq!(outlines_refused, parser_refused);
            prop_assert_eq!(outlined, without_ids(parsed));
        }
    }
}

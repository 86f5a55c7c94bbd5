/// Which API a request speaks, decided from its path.
///
/// Model endpoints carry a JSON body with a `model` that the parse layer
/// reads. `Passthrough` is any other `/v1/*` path, forwarded as is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Endpoint {
    /// `POST /v1/chat/completions`
    ChatCompletions,
    /// `POST /v1/completions`
    Completions,
    /// `POST /v1/embeddings`
    Embeddings,
    /// `POST /v1/responses` (OpenAI Responses API)
    Responses,
    /// `POST /v1/responses/compact`
    ResponsesCompact,
    /// `POST /v1/responses/input_tokens`
    ResponsesInputTokens,
    /// `GET`/`DELETE /v1/responses/{id}`, `POST /v1/responses/{id}/cancel`,
    /// `GET /v1/responses/{id}/input_items`: they follow their response id.
    ResponseById,
    /// `POST /v1/messages` (Anthropic Messages API)
    Messages,
    /// `POST /v1/messages/count_tokens`
    MessagesCountTokens,
    /// `GET /v1/models`
    Models,
    /// Any other `/v1/*` path.
    Passthrough,
}

/// The APIs an upstream may serve natively (`apis` in an upstream's config).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Api {
    /// `/v1/chat/completions`
    ChatCompletions,
    /// `/v1/completions`
    Completions,
    /// `/v1/embeddings`
    Embeddings,
    /// `/v1/responses` and its sub-routes
    Responses,
    /// `/v1/messages` and `/v1/messages/count_tokens`
    Messages,
}

impl Api {
    /// The config name: `chat_completions`, `completions`, `embeddings`,
    /// `responses`, `messages`.
    pub fn as_str(self) -> &'static str {
        match self {
            Api::ChatCompletions => "chat_completions",
            Api::Completions => "completions",
            Api::Embeddings => "embeddings",
            Api::Responses => "responses",
            Api::Messages => "messages",
        }
    }

    /// The API named `name` in config.
    pub fn from_name(name: &str) -> Option<Api> {
        Some(match name {
            "chat_completions" => Api::ChatCompletions,
            "completions" => Api::Completions,
            "embeddings" => Api::Embeddings,
            "responses" => Api::Responses,
            "messages" => Api::Messages,
            _ => return None,
        })
    }
}

/// Whose conventions a route follows: its error shape and credentials.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dialect {
    /// OpenAI: `{"error":{"message","type","param","code"}}`.
    OpenAi,
    /// Anthropic: `{"type":"error","error":{"type","message"}}`.
    Anthropic,
}

/// How a streamed answer of an endpoint is framed and how it ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StreamKind {
    /// Chat/completions chunks as `data:` events, ending with `data: [DONE]`.
    Chat,
    /// Responses events (`response.created` … `response.completed`).
    Responses,
    /// Anthropic events (`message_start` … `message_stop`).
    Messages,
}

impl Endpoint {
    /// The model whose description (OpenAI's "retrieve model", `GET` or
    /// `HEAD /v1/models/{id}`) a request asks for: [`Endpoint::model_of_path`],
    /// of a path the proxy routes as it is (not one [`Endpoint::from_path`]
    /// refuses: `..`, `%2F..`, `;`; an upstream could read those as another
    /// route). The routes and the auth gate decide by this one test.
    pub fn described_model<'p>(
        method: &http::Method,
        path: &'p str,
    ) -> Option<std::borrow::Cow<'p, str>> {
        let read = matches!(*method, http::Method::GET | http::Method::HEAD);
        if !read || Endpoint::from_path(path) != Some(Endpoint::Passthrough) {
            return None;
        }
        Endpoint::model_of_path(path)
    }

    /// The model a `/v1/models/{id}` path names, `%`-decoded (an SDK
    /// escapes a `/` in a fine-tuned model's id: `meta-llama%2FLlama-3.1-8B`,
    /// or writes it as it is); `None` for another path, and for an id that
    /// is empty or not UTF-8 once decoded.
    pub fn model_of_path(path: &str) -> Option<std::borrow::Cow<'_, str>> {
        let id = path.strip_prefix("/v1/models/")?;
        let id = id.strip_suffix('/').unwrap_or(id);
        let id = percent_encoding::percent_decode_str(id)
            .decode_utf8()
            .ok()?;
        (!id.is_empty()).then_some(id)
    }

    /// Classify a request path (without query). `None` for paths outside
    /// `/v1/`, and for paths an upstream may read as another path than the
    /// proxy does: `//`, `.` and `..` segments, `;`, backslashes, escapes.
    pub fn from_path(path: &str) -> Option<Endpoint> {
        // One trailing slash is the same route; more are an empty segment.
        let rest = path.strip_prefix("/v1/")?;
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        // The fixed routes are plain paths: only the others need the check.
        Some(match rest {
            "chat/completions" => Endpoint::ChatCompletions,
            "completions" => Endpoint::Completions,
            "embeddings" => Endpoint::Embeddings,
            "responses" => Endpoint::Responses,
            "responses/compact" => Endpoint::ResponsesCompact,
            "responses/input_tokens" => Endpoint::ResponsesInputTokens,
            "messages" => Endpoint::Messages,
            "messages/count_tokens" => Endpoint::MessagesCountTokens,
            "models" => Endpoint::Models,
            _ if cased_otherwise(rest) => return None,
            _ if !is_plain(rest) => return None,
            _ if response_id(path).is_some() => Endpoint::ResponseById,
            _ => Endpoint::Passthrough,
        })
    }

    /// Whether requests to this endpoint carry a JSON body with a `model` that
    /// the parse layer must read.
    pub fn has_model_body(self) -> bool {
        matches!(
            self,
            Endpoint::ChatCompletions
                | Endpoint::Completions
                | Endpoint::Embeddings
                | Endpoint::Responses
                | Endpoint::ResponsesCompact
                | Endpoint::ResponsesInputTokens
                | Endpoint::Messages
                | Endpoint::MessagesCountTokens
        )
    }

    /// The HTTP method this endpoint answers, if it is one fixed method.
    pub fn method(self) -> Option<http::Method> {
        if self.has_model_body() {
            Some(http::Method::POST)
        } else if self == Endpoint::Models {
            Some(http::Method::GET)
        } else {
            None
        }
    }

    /// The API this endpoint belongs to, for matching upstreams' `apis`.
    pub fn api(self) -> Option<Api> {
        Some(match self {
            Endpoint::ChatCompletions => Api::ChatCompletions,
            Endpoint::Completions => Api::Completions,
            Endpoint::Embeddings => Api::Embeddings,
            Endpoint::Responses
            | Endpoint::ResponsesCompact
            | Endpoint::ResponsesInputTokens
            | Endpoint::ResponseById => Api::Responses,
            Endpoint::Messages | Endpoint::MessagesCountTokens => Api::Messages,
            Endpoint::Models | Endpoint::Passthrough => return None,
        })
    }

    /// Whose error shape this endpoint answers in.
    pub fn dialect(self) -> Dialect {
        match self {
            Endpoint::Messages | Endpoint::MessagesCountTokens => Dialect::Anthropic,
            _ => Dialect::OpenAi,
        }
    }

    /// Whose error shape a request for `path` to this endpoint is answered
    /// in: [`Endpoint::dialect`], and Anthropic's anywhere under
    /// `/v1/messages` (the Message Batches API, `/v1/messages/batches…`,
    /// passes through; a path the proxy does not route there), so that
    /// every error the proxy gives on the Messages API's paths is the shape
    /// Anthropic's SDKs read.
    pub fn dialect_at(self, path: &str) -> Dialect {
        let messages = path
            .strip_prefix("/v1/messages")
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'));
        if messages {
            Dialect::Anthropic
        } else {
            self.dialect()
        }
    }

    /// How a streamed answer of this endpoint is framed, if it streams.
    /// A stored response read back as a stream (`GET
    /// /v1/responses/{id}?stream=true`, how a client resumes a background
    /// response) is framed as the stream that made it.
    pub fn stream_kind(self) -> Option<StreamKind> {
        match self {
            Endpoint::ChatCompletions | Endpoint::Completions => Some(StreamKind::Chat),
            Endpoint::Responses | Endpoint::ResponseById => Some(StreamKind::Responses),
            Endpoint::Messages => Some(StreamKind::Messages),
            _ => None,
        }
    }

    /// Whether a streamed answer of this endpoint is an OpenAI-style SSE
    /// stream ending in `data: [DONE]`.
    pub fn streams_done_sentinel(self) -> bool {
        self.stream_kind() == Some(StreamKind::Chat)
    }

    /// A short, stable name for metrics labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat_completions",
            Endpoint::Completions => "completions",
            Endpoint::Embeddings => "embeddings",
            Endpoint::Responses => "responses",
            Endpoint::ResponsesCompact => "responses_compact",
            Endpoint::ResponsesInputTokens => "responses_input_tokens",
            Endpoint::ResponseById => "response_by_id",
            Endpoint::Messages => "messages",
            Endpoint::MessagesCountTokens => "messages_count_tokens",
            Endpoint::Models => "models",
            Endpoint::Passthrough => "passthrough",
        }
    }
}

/// Whether a path (after `/v1/`, trailing slashes trimmed) means one thing
/// to every server. The proxy routes, pins and checks ids by the path as
/// written and forwards it as written; an upstream that merges slashes,
/// resolves dot segments, drops `;parameters` or decodes escapes (as nginx,
/// servlet containers and most web frameworks do) would read
/// `/v1//conversations/x`, `/v1/conversations/mine/../theirs`,
/// `/v1/conversations;x/theirs` or `/v1/conversations/conv%5Fx` as a path
/// the proxy never checked. Refused:
///
/// - an empty, `.` or `..` segment, a backslash or a `;`, written or
///   escaped;
/// - an escape of an unreserved character (`%5F` for `_`: the same path
///   as the character itself, RFC 3986), or a malformed escape;
/// - any escape under `responses/` and `conversations/`, where ids are
///   checked (`responses%2Fresp_x` decodes to one).
///
/// Other escapes pass: the SDKs escape path parameters, so a model id with
/// a slash is `/v1/models/meta-llama%2FLlama-3.1-8B-Instruct`.
fn is_plain(rest: &str) -> bool {
    if !segments_are_plain(rest.as_bytes()) {
        return false;
    }
    if !rest.contains('%') {
        return true;
    }
    let Some(decoded) = percent_decode(rest.as_bytes()) else {
        return false;
    };
    let checked = ["responses", "conversations"];
    let first = decoded.split(|b| *b == b'/').next().unwrap_or_default();
    segments_are_plain(&decoded) && !checked.iter().any(|c| first == c.as_bytes())
}

/// Whether the path names a route the proxy reads, in another case
/// (`chat/Completions`, `Responses/resp_1`): an upstream whose router
/// ignores case (some API gateways') would read it as that route, which the
/// proxy would have forwarded unchecked as another `/v1/*` path (no owner
/// check of a response id, no model allowlist, no token reservation). The
/// fixed routes are compared whole (the exact ones were matched before);
/// the ones that hold ids, by their first segment.
fn cased_otherwise(rest: &str) -> bool {
    const FIXED: [&str; 9] = [
        "chat/completions",
        "completions",
        "embeddings",
        "messages",
        "messages/count_tokens",
        "models",
        "responses",
        "responses/compact",
        "responses/input_tokens",
    ];
    const WITH_IDS: [&str; 3] = ["conversations", "models", "responses"];
    let first = rest.split('/').next().unwrap_or_default();
    FIXED.iter().any(|fixed| rest.eq_ignore_ascii_case(fixed))
        || WITH_IDS
            .iter()
            .any(|read| first != *read && first.eq_ignore_ascii_case(read))
}

fn segments_are_plain(path: &[u8]) -> bool {
    !path.iter().any(|b| matches!(b, b'\\' | b';'))
        && path
            .split(|b| *b == b'/')
            .all(|segment| !matches!(segment, b"" | b"." | b".."))
}

/// `path` with its escapes decoded; `None` for a malformed escape or one of
/// an unreserved character.
fn percent_decode(path: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(path.len());
    let mut bytes = path.iter();
    while let Some(&b) = bytes.next() {
        if b != b'%' {
            out.push(b);
            continue;
        }
        let hex = |c: Option<&u8>| c.and_then(|c| char::from(*c).to_digit(16));
        let byte = u8::try_from(hex(bytes.next())? * 16 + hex(bytes.next())?).ok()?;
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            return None;
        }
        out.push(byte);
    }
    Some(out)
}

/// The response id of `/v1/responses/{id}` and of every path under it
/// (`/cancel`, `/input_items`, and any other an upstream may serve): a path
/// that names a response is pinned to its upstream and checked against its
/// owner, whatever follows the id (failing closed, as conversation paths
/// do).
pub fn response_id(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/v1/responses/")?.trim_end_matches('/');
    let id = match rest.split_once('/') {
        None => rest,
        Some((id, _)) => id,
    };
    let reserved = matches!(id, "compact" | "input_tokens");
    (!id.is_empty() && !reserved).then_some(id)
}

/// What a path under `/v1/conversations` is: the collection itself
/// (`POST` creates a conversation), or one conversation's own path
/// (`/v1/conversations/{id}`, `/v1/conversations/{id}/items[/{item}]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConversationPath<'a> {
    /// `/v1/conversations`.
    Collection,
    /// A path naming this conversation id.
    Id(&'a str),
}

/// Where `path` is in OpenAI's Conversations API, if it is.
pub fn conversation_path(path: &str) -> Option<ConversationPath<'_>> {
    let rest = path.strip_prefix("/v1/conversations")?;
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() {
        return Some(ConversationPath::Collection);
    }
    let rest = rest.strip_prefix('/')?;
    let id = rest.split_once('/').map_or(rest, |(id, _)| id);
    (!id.is_empty()).then_some(ConversationPath::Id(id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_an_upstream_may_read_otherwise_are_not_routed() {
        for path in [
            "/v1//conversations/conv_1",
            "/v1/conversations//conv_1",
            "/v1/conversations/mine/../theirs",
            "/v1/conversations/./conv_1",
            "/v1/conversations/conv%5F1",
            "/v1/conversations;x/conv_1",
            "/v1/conversations/conv_x%2F..%2Fconv_y",
            "/v1/responses/resp%5F1",
            "/v1/responses%2Fresp_1",
            "/v1/responses/resp_1%20",
            "/v1/chat%2Fcompletions/%2E%2E",
            "/v1/models/%2E%2E",
            "/v1/models/a%2F..%2Fb",
            "/v1/models/a%5Cb",
            "/v1/models/a%3Bb",
            "/v1/models/a%2",
            "/v1/models/a%zz",
            "/v1/files\\x",
            "/v1/..",
            "/v1/chat/completions//",
            "/v1/models///",
            // Read as the route it names by a router that ignores case.
            "/v1/Responses/resp_1",
            "/v1/RESPONSES/resp_1/input_items",
            "/v1/Conversations/conv_1",
            "/v1/Chat/completions",
            "/v1/chat/Completions",
            "/v1/CHAT/COMPLETIONS/",
            "/v1/messages/Count_tokens",
            "/v1/Embeddings",
            "/v1/Models/m",
        ] {
            assert_eq!(Endpoint::from_path(path), None, "{path}");
        }
        for path in [
            "/v1/files/file-1",
            "/v1/conversations/conv_1/",
            "/v1/a.b/c..d",
            // As the SDKs escape a model id with a slash, or a space.
            "/v1/models/meta-llama%2FLlama-3.1-8B-Instruct",
            "/v1/models/my%20model",
            "/v1/models/caf%C3%A9",
        ] {
            assert_eq!(
                Endpoint::from_path(path),
                Some(Endpoint::Passthrough),
                "{path}"
            );
        }
    }

    #[test]
    fn conversation_paths() {
        use ConversationPath::*;
        for (path, want) in [
            ("/v1/conversations", Some(Collection)),
            ("/v1/conversations/", Some(Collection)),
            ("/v1/conversations/conv_1", Some(Id("conv_1"))),
            ("/v1/conversations/conv_1/", Some(Id("conv_1"))),
            ("/v1/conversations/conv_1/items", Some(Id("conv_1"))),
            ("/v1/conversations/conv_1/items/msg_2", Some(Id("conv_1"))),
            ("/v1/conversationsx", None),
            ("/v1/conversations//items", None),
            ("/v1/files/conv_1", None),
        ] {
            assert_eq!(conversation_path(path), want, "{path}");
        }
    }

    #[test]
    fn classifies_paths() {
        assert_eq!(
            Endpoint::from_path("/v1/chat/completions"),
            Some(Endpoint::ChatCompletions)
        );
        assert_eq!(
            Endpoint::from_path("/v1/completions/"),
            Some(Endpoint::Completions)
        );
        assert_eq!(
            Endpoint::from_path("/v1/files/abc"),
            Some(Endpoint::Passthrough)
        );
        assert_eq!(Endpoint::from_path("/v2/models"), None);
        assert_eq!(Endpoint::from_path("/healthz"), None);
        assert_eq!(
            Endpoint::from_path("/v1/responses"),
            Some(Endpoint::Responses)
        );
        assert_eq!(
            Endpoint::from_path("/v1/responses/compact"),
            Some(Endpoint::ResponsesCompact)
        );
        assert_eq!(
            Endpoint::from_path("/v1/responses/resp_1/cancel"),
            Some(Endpoint::ResponseById)
        );
        // Any path under a response id names it: pinned and owner-checked.
        assert_eq!(
            Endpoint::from_path("/v1/responses/resp_1/other"),
            Some(Endpoint::ResponseById)
        );
        assert_eq!(response_id("/v1/responses/resp_1/x/y"), Some("resp_1"));
        assert_eq!(response_id("/v1/responses/compact/x"), None);
        assert_eq!(
            Endpoint::from_path("/v1/messages/count_tokens"),
            Some(Endpoint::MessagesCountTokens)
        );
        assert_eq!(
            response_id("/v1/responses/resp_1/input_items"),
            Some("resp_1")
        );
        assert_eq!(response_id("/v1/responses/compact"), None);
    }

    #[test]
    fn api_names_round_trip() {
        for api in [
            Api::ChatCompletions,
            Api::Completions,
            Api::Embeddings,
            Api::Responses,
            Api::Messages,
        ] {
            assert_eq!(Api::from_name(api.as_str()), Some(api));
        }
        assert_eq!(Endpoint::Messages.dialect(), Dialect::Anthropic);
        for (path, dialect) in [
            ("/v1/messages/batches", Dialect::Anthropic),
            (
                "/v1/messages/batches/msgbatch_1/results",
                Dialect::Anthropic,
            ),
            ("/v1/messages//count_tokens", Dialect::Anthropic),
            ("/v1/messagesx", Dialect::OpenAi),
            ("/v1/files", Dialect::OpenAi),
        ] {
            assert_eq!(Endpoint::Passthrough.dialect_at(path), dialect, "{path}");
        }
        assert_eq!(Endpoint::ResponseById.api(), Some(Api::Responses));
    }
}

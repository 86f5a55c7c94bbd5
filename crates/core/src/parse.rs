//! The parse layer: body limit, content type, one JSON parse, [`RequestMeta`].

use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, header};
use http_body_util::{BodyExt, Limited};
use serde_json::{Map, Value};
use tower_layer::Layer;
use tower_service::Service;

use crate::budget::Claim;
use crate::{
    Body, BodyBudget, BoxError, BoxFuture, Endpoint, Error, GenerationCaps, RequestMeta,
    call_boxed, empty,
};

/// Limits the parse layer enforces.
#[derive(Clone, Copy, Debug)]
pub struct ParseLimits {
    /// Bodies larger than this are refused with 413 without being read.
    pub max_body_bytes: usize,
}

impl Default for ParseLimits {
    fn default() -> Self {
        ParseLimits {
            max_body_bytes: 4 * 1024 * 1024,
        }
    }
}

/// Buffers and parses a request's JSON body once, and puts a [`RequestMeta`]
/// into its extensions for the layers below.
///
/// - model endpoints (`/v1/chat/completions`, `/v1/completions`,
///   `/v1/embeddings`): a non-JSON content type is 415, a body over the limit
///   413 (decided from `content-length` before reading when it is given),
///   malformed JSON 400 `invalid_json`, a non-object 400 `invalid_body`, no
///   string `model` 400 `missing_model`;
/// - other `/v1/*` paths: a JSON body is buffered (same limit) and its `model`
///   read if present, so it can be routed; any other body streams through,
///   still bounded by the limit.
///
/// The request handed to the inner service carries an empty body when the
/// body was buffered: the bytes live in [`RequestMeta`].
///
/// The endpoint is told by the request's path as the client's OpenAI or
/// Anthropic SDK sends it, `/v1/…` ([`Endpoint::from_path`]), and every
/// layer below dispatches on it (the upstream client joins it onto the
/// upstream's base URL). An app that mounts the stack under a prefix of its
/// own strips the prefix first (axum's `Router::nest_service` does; its
/// `route_service` does not): a path such as `/llm/v1/chat/completions` is
/// no model endpoint, and goes on as passthrough (the cache bypasses it,
/// the upstream gets that path and answers its own 404).
///
/// A model body is checked (well-formed, an object, no key repeated at any
/// depth, within the budget) without being built: the layers that read it
/// build it on first use ([`RequestMeta::json`]), and a stack whose layers
/// read only `model` and `stream` never does. A stack whose layers read
/// every body (a cache, token limits) builds it here, in the same pass as
/// the check: see [`ParseLayer::build_eagerly`].
#[derive(Clone, Debug)]
pub struct ParseLayer {
    limits: ParseLimits,
    budget: Option<BodyBudget>,
    eager: bool,
}

impl ParseLayer {
    /// A parse layer with these limits.
    pub fn new(limits: ParseLimits) -> Self {
        ParseLayer {
            limits,
            budget: None,
            eager: false,
        }
    }

    /// Build every model body's value as it is checked (one pass), rather
    /// than when a layer first asks for it (a check, then a build): for
    /// stacks in which a layer reads every body, such as prefix routing
    /// (its prompt).
    pub fn build_eagerly(mut self, eager: bool) -> Self {
        self.eager = eager;
        self
    }

    /// Count every buffered body against `budget`: one that would pass it is
    /// refused with 503 `server_overloaded` (see [`BodyBudget`]).
    pub fn with_budget(mut self, budget: BodyBudget) -> Self {
        self.budget = Some(budget);
        self
    }
}

impl<S> Layer<S> for ParseLayer {
    type Service = Parse<S>;

    fn layer(&self, inner: S) -> Parse<S> {
        Parse {
            inner,
            limits: self.limits,
            budget: self.budget.clone(),
            eager: self.eager,
        }
    }
}

/// The service of [`ParseLayer`].
#[derive(Clone, Debug)]
pub struct Parse<S> {
    inner: S,
    limits: ParseLimits,
    budget: Option<BodyBudget>,
    eager: bool,
}

impl<S, B> Service<Request<B>> for Parse<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Error> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = Error;
    type Future = BoxFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let limit = self.limits.max_body_bytes;
        // What the head decides is decided here, before the future: it holds
        // the request once (split), not once more for each step.
        let head = match Head::of(req, limit) {
            Ok(head) => head,
            Err(e) => return Box::pin(std::future::ready(Err(e))),
        };
        // The tower idiom: the clone is the one that was not driven to ready.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        // The claim shares the budget: no clone of the budget itself.
        let claim = self.budget.as_ref().map(BodyBudget::claim);
        let budget = self.budget.clone();
        let eager = self.eager;
        Box::pin(async move {
            let mut req = head.parse(limit, claim, eager).await?;
            if let Some(budget) = budget
                && let Some(meta) = req.extensions_mut().get_mut::<RequestMeta>()
            {
                meta.set_budget(budget);
            }
            call_boxed(&mut inner, req).await
        })
    }
}

/// Parse one request: the work of [`Parse`], usable without the layer.
pub async fn parse<B>(req: Request<B>, limit: usize) -> Result<Request<Body>, Error>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    parse_within(req, limit, None).await
}

/// [`parse`], counting a buffered body against `budget`.
pub async fn parse_within<B>(
    req: Request<B>,
    limit: usize,
    budget: Option<&BodyBudget>,
) -> Result<Request<Body>, Error>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    parse_claimed(req, limit, budget.map(BodyBudget::claim), false).await
}

async fn parse_claimed<B>(
    req: Request<B>,
    limit: usize,
    claim: Option<Claim>,
    eager: bool,
) -> Result<Request<Body>, Error>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    Head::of(req, limit)?.parse(limit, claim, eager).await
}

/// A request split, with what its head alone decides checked: the declared
/// length against the limit, and the content type.
struct Head<B> {
    parts: http::request::Parts,
    body: B,
    endpoint: Endpoint,
    /// `Err(type)` for a content type that is not JSON.
    json_content: Result<(), String>,
}

impl<B> Head<B>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    fn of(req: Request<B>, limit: usize) -> Result<Head<B>, Error> {
        let declared = content_length(req.headers());
        let endpoint = Endpoint::from_path(req.uri().path()).unwrap_or(Endpoint::Passthrough);
        if declared.is_some_and(|len| len > limit as u64) {
            return Err(Error::RequestTooLarge { limit });
        }
        let json_content = json_content_type(req.headers())?;
        if endpoint.has_model_body() {
            if let Err(ct) = json_content {
                return Err(Error::UnsupportedMediaType(ct));
            }
            if let Some(coding) = content_coding(req.headers()) {
                return Err(Error::UnsupportedContentEncoding(coding));
            }
        }
        let (parts, body) = req.into_parts();
        Ok(Head {
            parts,
            body,
            endpoint,
            json_content,
        })
    }

    /// The body read (or passed on) and checked, and the request as the
    /// layers below take it.
    ///
    /// Not an `async fn`, whose arguments its future holds twice (as
    /// arguments and as locals): 736 bytes that way, 440 this way, for the
    /// proxy's body type.
    #[allow(
        clippy::manual_async_fn,
        reason = "an async fn's future holds its arguments twice"
    )]
    fn parse(
        mut self,
        limit: usize,
        mut claim: Option<Claim>,
        eager: bool,
    ) -> impl Future<Output = Result<Request<Body>, Error>> + Send {
        async move {
            let endpoint = self.endpoint;
            let meta = if endpoint.has_model_body() {
                let bytes = read_limited(self.body, limit, claim.as_mut()).await?;
                if eager {
                    return built_model_body(self.parts, bytes, claim, endpoint);
                }
                checked_model_body(bytes, claim, endpoint)?
            } else if self.json_content.is_ok()
                && carries_body(&self.parts.method, &self.parts.headers)
            {
                // Other routes: buffer JSON to learn its model; a body that is
                // not an object goes on as is, for the upstream to judge.
                let bytes = read_limited(self.body, limit, claim.as_mut()).await?;
                match object_within(&bytes, claim.as_mut()) {
                    Ok(Some((json, built))) => {
                        RequestMeta::parsed(endpoint, hold(claim, bytes, built)?, json)
                    }
                    // An object whose model (or any top-level key) is ambiguous.
                    Err(Unparsed::Json(e)) if e.is_data() => {
                        return Err(Error::InvalidJson(e.to_string()));
                    }
                    Err(Unparsed::OverBudget(error)) => return Err(error),
                    _ => {
                        let bytes = hold(claim, bytes, 0)?;
                        let meta = RequestMeta::unbuffered(endpoint);
                        self.parts.extensions.insert(meta);
                        return Ok(Request::from_parts(self.parts, crate::full(bytes)));
                    }
                }
            } else {
                self.parts
                    .extensions
                    .insert(RequestMeta::unbuffered(endpoint));
                // Streamed on as it comes: past the limit the body fails with
                // the client's 413, which the upstream client hands back as
                // it is.
                let body = Limited::new(self.body, limit)
                    .map_err(move |e| -> BoxError {
                        if e.is::<http_body_util::LengthLimitError>() {
                            Box::new(Error::RequestTooLarge { limit })
                        } else {
                            e
                        }
                    })
                    .boxed_unsync();
                return Ok(Request::from_parts(self.parts, body));
            };
            self.parts.extensions.insert(meta);
            Ok(Request::from_parts(self.parts, empty()))
        }
    }
}

/// A model body checked without being built: well-formed, an object, a
/// non-empty string `model`, a boolean `stream` if any.
fn checked_model_body(
    bytes: Bytes,
    mut claim: Option<Claim>,
    endpoint: Endpoint,
) -> Result<RequestMeta, Error> {
    let (top, built) = match check_object(&bytes, claim.as_mut()) {
        Ok(Some(checked)) => checked,
        Ok(None) => return Err(Error::InvalidBody),
        Err(Unparsed::Json(e)) => return Err(Error::InvalidJson(e.to_string())),
        Err(Unparsed::OverBudget(error)) => return Err(error),
    };
    let model = match top.model {
        Seen::Str(m) if !m.is_empty() => Ok(Arc::<str>::from(m)),
        _ => Err(Error::MissingModel),
    };
    let stream = match top.stream {
        Seen::Absent | Seen::Null => Ok(false),
        Seen::Bool(stream) => Ok(stream),
        Seen::Str(_) | Seen::Uint(_) | Seen::List { .. } | Seen::Other => Err(stream_not_a_bool()),
    };
    let (names_state, caps) = (top.names_state, top.caps);
    let bytes = hold(claim, bytes, built)?;
    Ok(RequestMeta::checked(
        endpoint,
        bytes,
        Some(model?),
        stream?,
        names_state,
        caps,
    ))
}

/// A model body built as it is checked ([`ParseLayer::build_eagerly`]),
/// with the same answers as the check alone.
fn built_model_body(
    mut parts: http::request::Parts,
    bytes: Bytes,
    mut claim: Option<Claim>,
    endpoint: Endpoint,
) -> Result<Request<Body>, Error> {
    let (json, built) = match object_within(&bytes, claim.as_mut()) {
        Ok(Some(parsed)) => parsed,
        Ok(None) => return Err(Error::InvalidBody),
        Err(Unparsed::Json(e)) => return Err(Error::InvalidJson(e.to_string())),
        Err(Unparsed::OverBudget(error)) => return Err(error),
    };
    let bytes = hold(claim, bytes, built)?;
    match json.get("model") {
        Some(Value::String(m)) if !m.is_empty() => {}
        _ => return Err(Error::MissingModel),
    }
    if json
        .get("stream")
        .is_some_and(|s| !matches!(s, Value::Bool(_) | Value::Null))
    {
        return Err(stream_not_a_bool());
    }
    parts
        .extensions
        .insert(RequestMeta::parsed(endpoint, bytes, json));
    Ok(Request::from_parts(parts, empty()))
}

/// Every layer reads `stream` as a boolean; an upstream may read `"yes"`
/// as true and stream an answer nobody here expects.
fn stream_not_a_bool() -> Error {
    Error::UnsupportedParameter {
        param: "stream".into(),
        message: "`stream` must be true or false".into(),
    }
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// `Ok(())` for a JSON content type or none; `Err(type)` for anything else.
fn json_content_type(headers: &HeaderMap) -> Result<Result<(), String>, Error> {
    let mut values = headers.get_all(header::CONTENT_TYPE).iter();
    let Some(value) = values.next() else {
        return Ok(Ok(()));
    };
    // Two types: which one the upstream reads is its choice, not the
    // proxy's: not one JSON type.
    if values.next().is_some() {
        let sent: Vec<_> = headers
            .get_all(header::CONTENT_TYPE)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()))
            .collect();
        return Ok(Err(sent.join(", ")));
    }
    let bytes = value.as_bytes();
    let mut parts = bytes.split(|b| *b == b';');
    let essence = parts.next().unwrap_or_default().trim_ascii();
    let suffix = essence.len().checked_sub(5).map(|at| &essence[at..]);
    let is_json = essence.eq_ignore_ascii_case(b"application/json")
        || (suffix.is_some_and(|s| s.eq_ignore_ascii_case(b"+json")) && essence.contains(&b'/'));
    // JSON is UTF-8 (RFC 8259 §8.1): a body said to be in another charset
    // is one the proxy would read as other than its sender meant, and the
    // upstream as the label says.
    let utf8 = parts.all(|param| {
        let param = param.trim_ascii();
        match param.get(..8) {
            Some(name) if name.eq_ignore_ascii_case(b"charset=") => {
                let charset = param[8..].trim_ascii();
                let charset = charset
                    .strip_prefix(b"\"")
                    .and_then(|c| c.strip_suffix(b"\""))
                    .unwrap_or(charset);
                charset.eq_ignore_ascii_case(b"utf-8") || charset.eq_ignore_ascii_case(b"utf8")
            }
            _ => true,
        }
    });
    Ok(if is_json && utf8 {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(bytes).into_owned())
    })
}

/// The body's content codings as sent, when there is one (`identity` is
/// none).
fn content_coding(headers: &HeaderMap) -> Option<String> {
    let values = headers.get_all(header::CONTENT_ENCODING);
    let coded = values
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .any(|c| !c.is_empty() && !c.eq_ignore_ascii_case(b"identity"));
    coded.then(|| {
        let sent: Vec<_> = values
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()))
            .collect();
        sent.join(", ")
    })
}

/// Whether the parse layer reads this request's whole body into memory
/// before the layers below see it: a model route's, or a JSON one on
/// another route. Other bodies stream on to the upstream as they come.
pub fn buffers_body(method: &http::Method, path: &str, headers: &HeaderMap) -> bool {
    Endpoint::from_path(path).is_some_and(Endpoint::has_model_body)
        || (matches!(json_content_type(headers), Ok(Ok(()))) && carries_body(method, headers))
}

fn carries_body(method: &http::Method, headers: &HeaderMap) -> bool {
    if content_length(headers) == Some(0) {
        return false;
    }
    !matches!(
        *method,
        http::Method::GET | http::Method::HEAD | http::Method::DELETE | http::Method::OPTIONS
    ) || content_length(headers).is_some()
}

/// Read a whole body of at most `limit` bytes (413 past it), holding the
/// bytes received in `claim` (503 when its budget has no room for them).
///
/// Only bytes that came are counted, not a `content-length` still to come:
/// heads that announce bodies and send nothing must not take the budget
/// from everyone else. Likewise the buffer grows with what comes (a body in
/// several frames may hold up to twice its bytes while it grows).
async fn read_limited<B>(
    body: B,
    limit: usize,
    mut claim: Option<&mut Claim>,
) -> Result<Bytes, Error>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let mut body = std::pin::pin!(body);
    let mut first = Bytes::new();
    let mut joined: Option<Vec<u8>> = None;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(read_error)?.into_data() else {
            continue; // trailers
        };
        let total = first.len() + joined.as_ref().map_or(0, Vec::len) + data.len();
        if total > limit {
            return Err(Error::RequestTooLarge { limit });
        }
        if let Some(claim) = &mut claim
            && !claim.hold(total)
        {
            return Err(claim.full());
        }
        if let Some(joined) = &mut joined {
            joined.extend_from_slice(&data);
        } else if first.is_empty() {
            first = data;
        } else if !data.is_empty() {
            let mut all = Vec::with_capacity(total);
            all.extend_from_slice(&std::mem::take(&mut first));
            all.extend_from_slice(&data);
            joined = Some(all);
        }
    }
    Ok(joined.map_or(first, Bytes::from))
}

/// `bytes`, holding `claim` for them and for the `built` bytes of the value
/// parsed from them, until their last clone is dropped (the parsed value
/// lives beside them in [`RequestMeta`]).
fn hold(claim: Option<Claim>, bytes: Bytes, built: usize) -> Result<Bytes, Error> {
    let Some(mut claim) = claim else {
        return Ok(bytes);
    };
    claim.shrink_to(bytes.len());
    let needed = bytes.len().saturating_add(built);
    if !claim.hold(needed) {
        return Err(over_budget(&claim, needed));
    }
    Ok(claim.attach(bytes))
}

/// A body's read error as the request's error: the body's own verdict (e.g.
/// a read timeout of the server's body), else an unreadable body.
fn read_error(e: impl Into<BoxError>) -> Error {
    match e.into().downcast::<Error>() {
        Ok(error) => *error,
        Err(e) => Error::UnreadableBody(e.to_string()),
    }
}

/// Parse a request body that must be a JSON object with no key repeated in
/// any object: 400 `invalid_json` for malformed JSON or a repeated key, 400
/// `invalid_body` for JSON that is not an object.
///
/// A repeated key is refused because parsers disagree on it: serde_json
/// (and Python, and Go) keep the last value, others the first. A body with
/// `"model"` twice could be checked against a key's allowlist with one
/// model and generated by an upstream with the other; the same for
/// `previous_response_id`, `stream`, `stream_options.include_usage` or a
/// WebSocket message's `type`, and a cache key made from one reading of a
/// message's `content` could store the answer to the other. The check is
/// free: the parse looks each key up to insert it anyway.
pub fn parse_object(bytes: &[u8]) -> Result<Map<String, Value>, Error> {
    parse_object_within(bytes, None).map(|(map, _)| map)
}

/// [`parse_object`], holding `bytes` and the value they are parsed into in
/// `budget` (see [`BodyBudget`]) until the returned [`BudgetHold`] is
/// dropped: 503 `server_overloaded` when the budget has no room for them
/// now, 413 `request_too_large` when it never could.
pub fn parse_object_within(
    bytes: &[u8],
    budget: Option<&BodyBudget>,
) -> Result<(Map<String, Value>, BudgetHold), Error> {
    let mut claim = budget.map(BodyBudget::claim);
    if let Some(claim) = &mut claim
        && !claim.hold(bytes.len())
    {
        return Err(over_budget(claim, bytes.len()));
    }
    match object_within(bytes, claim.as_mut()) {
        Ok(Some((map, built))) => {
            if let Some(claim) = &mut claim {
                claim.shrink_to(bytes.len());
                if !claim.hold(bytes.len().saturating_add(built)) {
                    return Err(over_budget(claim, bytes.len().saturating_add(built)));
                }
            }
            Ok((map, BudgetHold { claim }))
        }
        Ok(None) => Err(Error::InvalidBody),
        Err(Unparsed::Json(e)) => Err(Error::InvalidJson(e.to_string())),
        Err(Unparsed::OverBudget(error)) => Err(error),
    }
}

/// Bytes held in a [`BodyBudget`] for a parsed body, or for what a layer
/// keeps of an answer (the cache, an answer it will store); given back when
/// dropped.
#[derive(Debug)]
pub struct BudgetHold {
    claim: Option<Claim>,
}

impl BudgetHold {
    /// Nothing held yet in `budget`'s pool for answers
    /// ([`BodyBudget::answers_in_use`]); with `None`, a hold that counts
    /// nothing and always has room.
    pub fn for_answer(budget: Option<&BodyBudget>) -> Self {
        BudgetHold {
            claim: budget.map(|b| b.claim_in(crate::budget::Pool::Answers)),
        }
    }

    /// Nothing held yet in `budget`'s pool for request bodies
    /// ([`BodyBudget::in_use`]): for bytes of a request read some other
    /// way than as a body (a WebSocket message as it comes); with `None`, a
    /// hold that counts nothing and always has room.
    pub fn for_bodies(budget: Option<&BodyBudget>) -> Self {
        BudgetHold {
            claim: budget.map(BodyBudget::claim),
        }
    }

    /// The bytes held now.
    pub fn held(&self) -> usize {
        self.claim.as_ref().map_or(0, Claim::held)
    }

    /// Hold `total` bytes in all (more than now, or less): `false`, holding
    /// what it held, when the budget has no room for them now.
    pub fn hold(&mut self, total: usize) -> bool {
        match &mut self.claim {
            None => true,
            Some(claim) if total > claim.held() => claim.hold(total),
            Some(claim) => {
                claim.shrink_to(total);
                true
            }
        }
    }
}

/// The answer to a body whose bytes and value (`needed` bytes so far) the
/// claim's budget could not hold: 413 when the whole budget is too small
/// for them, 503 when others hold what is missing now.
fn over_budget(claim: &Claim, needed: usize) -> Error {
    if needed > claim.limit() {
        Error::ParsedTooLarge {
            limit: claim.limit(),
        }
    } else {
        claim.full()
    }
}

/// An object parsed, and the heap bytes it holds.
type Built = (Map<String, Value>, usize);

/// Why [`object_within`] built nothing.
enum Unparsed {
    /// Not JSON, or a key repeated (category `Data`).
    Json(serde_json::Error),
    /// The claim could not hold the value as it grew: the answer.
    OverBudget(Error),
}

/// `bytes` as an object without repeated keys, and the heap bytes the
/// value holds (an estimate, see [`Tally`]); `None` for JSON that is not an
/// object. With a `claim` (holding the body's bytes), the value is held in
/// it as it grows, and building stops once the claim cannot hold more.
///
/// The parsed value, not the body, is most of a request's memory: a small
/// JSON object becomes a B-tree leaf of some 600 bytes, so a body of
/// `{"":0}` objects holds ~100 times its size once parsed, and plain chat
/// messages ~9 times. The body budget counts both, from the first byte
/// built: no parse builds much past what the budget has room for.
fn object_within(bytes: &[u8], claim: Option<&mut Claim>) -> Result<Option<Built>, Unparsed> {
    Ok(
        tallied(bytes, claim, |tally| build(bytes, tally))?.and_then(
            |(value, built)| match value {
                Value::Object(map) => Some((map, built)),
                _ => None,
            },
        ),
    )
}

/// What `read` makes of `bytes`, an object, with `claim` holding what it
/// tallies, and the tally; `None` for JSON that is not an object (checked,
/// not read: repeats in it decide nothing here).
fn tallied<'c, T>(
    bytes: &[u8],
    claim: Option<&'c mut Claim>,
    read: impl for<'t> FnOnce(&'t Tally<'c>) -> Result<T, serde_json::Error>,
) -> Result<Option<(T, usize)>, Unparsed> {
    if bytes.trim_ascii_start().first() != Some(&b'{') {
        serde_json::from_slice::<serde::de::IgnoredAny>(bytes).map_err(Unparsed::Json)?;
        return Ok(None);
    }
    let tally = Tally {
        built: Cell::new(0),
        base: bytes.len(),
        held: Cell::new(0),
        claim: claim.map(RefCell::new),
        over: Cell::new(false),
    };
    match read(&tally) {
        Ok(value) => Ok(Some((value, tally.built.get()))),
        Err(e) => Err(tally_error(&tally, e)),
    }
}

/// `bytes` as one JSON value, tallied.
fn build(bytes: &[u8], tally: &Tally<'_>) -> Result<Value, serde_json::Error> {
    read_json(bytes, Unique(tally))
}

/// Read `bytes`, all of them, with `read`.
///
/// JSON text is UTF-8 (RFC 8259): checked once for the whole body, which is
/// cheaper than serde_json's check of each string as it reads a slice (a
/// call per string, most of them a few bytes long). Bytes that are not
/// UTF-8 are read as a slice, for serde_json's own error.
fn read_json<'de, T>(
    bytes: &'de [u8],
    read: impl ReadWith<'de, T>,
) -> Result<T, serde_json::Error> {
    match crate::utf8(bytes) {
        Some(text) => read.all(serde_json::Deserializer::from_str(text)),
        None => read.all(serde_json::Deserializer::from_slice(bytes)),
    }
}

/// `bytes` as a `T`, as `serde_json::from_slice` reads them, with UTF-8
/// checked once for the whole text rather than string by string (the
/// slice reader checks each string as it reads it: a call per key and per
/// value); the same errors.
pub fn json_from_slice<'de, T: serde::Deserialize<'de>>(
    bytes: &'de [u8],
) -> Result<T, serde_json::Error> {
    match crate::utf8(bytes) {
        Some(text) => serde_json::from_str(text),
        None => serde_json::from_slice(bytes),
    }
}

/// `bytes` as one JSON value, read as the parse layer reads a body: a key
/// repeated in any object is an error, and every object is read as the
/// object it is. (serde_json's own `Value` reader, with the `raw_value`
/// feature the workspace builds it with, reads a nested object whose one
/// key is `$serde_json::private::RawValue` as the JSON text its string
/// holds: `{"$serde_json::private::RawValue":"5"}` comes out `5`. The
/// upstream gets the object; a cache key made from such a reading would
/// make two different requests one.) Use it, not `serde_json`'s readers,
/// for any value a client sent.
///
/// ```
/// let text = br#"{"a":{"$serde_json::private::RawValue":"5"}}"#;
/// let read = llm_proxy_core::value_from_slice(text).unwrap();
/// assert!(read["a"].is_object());
/// assert!(llm_proxy_core::value_from_slice(br#"{"a":1,"a":2}"#).is_err());
/// ```
pub fn value_from_slice(bytes: &[u8]) -> Result<Value, serde_json::Error> {
    let tally = Tally {
        built: Cell::new(0),
        base: bytes.len(),
        held: Cell::new(0),
        claim: None,
        over: Cell::new(false),
    };
    build(bytes, &tally)
}

/// The object `bytes` hold, read as [`value_from_slice`] reads them; `None`
/// for anything else.
pub(crate) fn object_tree(bytes: &[u8]) -> Option<Map<String, Value>> {
    match value_from_slice(bytes) {
        Ok(Value::Object(map)) => Some(map),
        _ => None,
    }
}

/// `bytes` as a `T` ([`json_from_slice`]), if they are a JSON object.
/// serde reads a struct from an array too (its fields in order), and an
/// upstream's `["response.completed"]` would read as an event of that
/// type: what the APIs send as an object is read only from one.
pub fn object_from_slice<'de, T: serde::Deserialize<'de>>(
    bytes: &'de [u8],
) -> Result<T, serde_json::Error> {
    if bytes.trim_ascii_start().first() != Some(&b'{') {
        return Err(not_an_object());
    }
    json_from_slice(bytes)
}

/// `text` as a `T`, if it is a JSON object ([`object_from_slice`]).
pub fn object_from_str<'de, T: serde::Deserialize<'de>>(
    text: &'de str,
) -> Result<T, serde_json::Error> {
    if !text.trim_ascii_start().starts_with('{') {
        return Err(not_an_object());
    }
    serde_json::from_str(text)
}

fn not_an_object() -> serde_json::Error {
    serde::de::Error::custom("not a JSON object")
}

/// A read of one JSON value, whatever serde_json reads it from.
trait ReadWith<'de, T> {
    fn read<R: serde_json::de::Read<'de>>(
        self,
        d: &mut serde_json::Deserializer<R>,
    ) -> Result<T, serde_json::Error>;

    /// The value, and nothing after it.
    fn all<R: serde_json::de::Read<'de>>(
        self,
        mut d: serde_json::Deserializer<R>,
    ) -> Result<T, serde_json::Error>
    where
        Self: Sized,
    {
        let value = self.read(&mut d)?;
        d.end()?;
        Ok(value)
    }
}

/// The heap bytes a value being built holds, estimated from the shapes it
/// is made of, and the claim that holds them.
///
/// The estimate follows serde_json's `Value` on a 64-bit target, with the
/// `preserve_order` feature the workspace builds it with: an array holds a
/// slot per element of its capacity; an object (an `IndexMap`) holds an
/// entry per element of its capacity and a hash table of indices, grown as
/// [`map_growth`] says; a string or key holds its capacity. Measured
/// against an allocator that counts, it is within a few percent for bodies
/// of small objects, of numbers and of chat messages.
struct Tally<'c> {
    built: Cell<usize>,
    /// The body's bytes, which the claim holds besides the value.
    base: usize,
    /// How much of the value the claim holds now (a step ahead of it).
    held: Cell<usize>,
    claim: Option<RefCell<&'c mut Claim>>,
    /// The claim could not hold more.
    over: Cell<bool>,
}

/// A `Value`'s slot in an array or an object.
const SLOT: usize = std::mem::size_of::<Value>();
/// An entry of a `Map` (an `IndexMap`): its key, its value and its hash.
const ENTRY: usize = std::mem::size_of::<String>() + SLOT + std::mem::size_of::<u64>();

/// The heap bytes a `Map` grows by as its entry number `len` (from 0) goes
/// in. Its hash table (hashbrown's: a `usize` index and a control byte per
/// bucket, and a group's width of control bytes besides) has 4 buckets
/// for 3 entries, 8 for 7, then 16 for 14 and doubles from there, growing
/// when full; the entries' `Vec` grows to the table's capacity with it.
fn map_growth(len: usize) -> usize {
    /// Bytes per bucket: an index and a control byte.
    const BUCKET: usize = std::mem::size_of::<usize>() + 1;
    let (capacity, buckets, grown, more_buckets) = match len {
        0 => return 3 * ENTRY + 4 * BUCKET + 16,
        3 => (3, 4, 7, 8),
        7 => (7, 8, 14, 16),
        _ if len % 14 == 0 && (len / 14).is_power_of_two() => {
            (len, len / 7 * 8, 2 * len, len / 7 * 16)
        }
        _ => return 0,
    };
    (grown - capacity) * ENTRY + (more_buckets - buckets) * BUCKET
}
/// How far ahead of the value the claim is grown: one atomic update per
/// step, not per node.
const STEP: usize = 64 << 10;

impl Tally<'_> {
    fn add<E: serde::de::Error>(&self, bytes: usize) -> Result<(), E> {
        let built = self.built.get().saturating_add(bytes);
        self.built.set(built);
        let Some(claim) = &self.claim else {
            return Ok(());
        };
        if built <= self.held.get() {
            return Ok(());
        }
        let mut claim = claim.borrow_mut();
        let needed = self.base.saturating_add(built);
        // A step ahead, but never past the whole budget for want of the
        // step alone.
        let ahead = needed.saturating_add(STEP).min(claim.limit()).max(needed);
        // (The step is room others may need: without it, just what is.)
        let held = [ahead, needed].into_iter().find(|&total| claim.hold(total));
        let Some(held) = held else {
            self.over.set(true);
            return Err(E::custom("the parsed body passes the body budget"));
        };
        self.held.set(held - self.base);
        Ok(())
    }
}

/// A JSON value in which no object repeats a key (what serde_json's own
/// `Value` visitor builds, with the repeat an error instead of last-wins),
/// tallied as it is built.
#[derive(Clone, Copy)]
struct Unique<'t, 'c>(&'t Tally<'c>);

impl<'de> serde::de::DeserializeSeed<'de> for Unique<'_, '_> {
    type Value = Value;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

/// A key, tallied.
struct Key<'t, 'c>(&'t Tally<'c>);

impl<'de> serde::de::DeserializeSeed<'de> for Key<'_, '_> {
    type Value = String;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
        let key = <String as serde::Deserialize>::deserialize(d)?;
        self.0.add(key.capacity())?;
        Ok(key)
    }
}

impl<'de> serde::de::Visitor<'de> for Unique<'_, '_> {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<Value, A::Error> {
        let mut map = Map::new();
        while let Some(key) = a.next_key_seed(Key(self.0))? {
            self.0.add(map_growth(map.len()))?;
            match map.entry(key) {
                serde_json::map::Entry::Vacant(slot) => {
                    slot.insert(a.next_value_seed(self)?);
                }
                serde_json::map::Entry::Occupied(taken) => {
                    return Err(serde::de::Error::custom(format_args!(
                        "duplicate key `{}`",
                        taken.key()
                    )));
                }
            }
        }
        Ok(Value::Object(map))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(a.size_hint().unwrap_or(0).min(4096));
        self.0.add(items.capacity() * SLOT)?;
        while let Some(item) = a.next_element_seed(self)? {
            let before = items.capacity();
            items.push(item);
            self.0.add((items.capacity() - before) * SLOT)?;
        }
        Ok(Value::Array(items))
    }

    fn visit_bool<E>(self, b: bool) -> Result<Value, E> {
        Ok(Value::Bool(b))
    }

    fn visit_i64<E>(self, n: i64) -> Result<Value, E> {
        Ok(Value::from(n))
    }

    fn visit_u64<E>(self, n: u64) -> Result<Value, E> {
        Ok(Value::from(n))
    }

    fn visit_f64<E>(self, n: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(n).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Value, E> {
        self.0.add(s.len())?;
        Ok(Value::String(s.to_owned()))
    }

    fn visit_string<E: serde::de::Error>(self, s: String) -> Result<Value, E> {
        self.0.add(s.capacity())?;
        Ok(Value::String(s))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
}

/// What the check of a model body learned for the layers that read no
/// more of it: its `model` and `stream` fields.
struct Top<'de> {
    model: Seen<'de>,
    stream: Seen<'de>,
    /// A key of [`crate::meta::STATE_KEYS`] is there.
    names_state: bool,
    caps: GenerationCaps,
}

/// A value as the check saw it: only strings, booleans and non-negative
/// integers are kept, and strings only where asked for (the top level's
/// `model`).
enum Seen<'de> {
    Absent,
    Str(Cow<'de, str>),
    Bool(bool),
    Uint(u64),
    Null,
    /// An array: its length, and whether its first element is a
    /// non-negative integer (a completions `prompt` of token ids is one
    /// prompt; one of strings, or of token-id arrays, is one per element).
    List {
        len: usize,
        of_ints: bool,
    },
    Other,
}

/// `bytes` checked as [`object_within`] checks them, building nothing: the
/// same errors (malformed JSON, a repeated key at any depth, a value past
/// the claim) and the same tally of what the value would hold once built,
/// which the claim holds from now on (the value is built when a layer first
/// asks for it, see [`RequestMeta::json`]). `None` for JSON that is not an
/// object.
fn check_object<'de>(
    bytes: &'de [u8],
    claim: Option<&mut Claim>,
) -> Result<Option<(Top<'de>, usize)>, Unparsed> {
    tallied(bytes, claim, |tally| read_json(bytes, TopCheck(tally)))
}

/// Why a tallied parse or check failed: the claim, or the JSON.
fn tally_error(tally: &Tally<'_>, e: serde_json::Error) -> Unparsed {
    match &tally.claim {
        Some(claim) if tally.over.get() => {
            let needed = tally.base.saturating_add(tally.built.get());
            Unparsed::OverBudget(over_budget(&claim.borrow(), needed))
        }
        _ => Unparsed::Json(e),
    }
}

/// The top-level object of a model body, checked.
struct TopCheck<'t, 'c>(&'t Tally<'c>);

impl<'de> ReadWith<'de, Top<'de>> for TopCheck<'_, '_> {
    fn read<R: serde_json::de::Read<'de>>(
        self,
        d: &mut serde_json::Deserializer<R>,
    ) -> Result<Top<'de>, serde_json::Error> {
        serde::de::Deserializer::deserialize_map(d, self)
    }
}

impl<'de> ReadWith<'de, Value> for Unique<'_, '_> {
    fn read<R: serde_json::de::Read<'de>>(
        self,
        d: &mut serde_json::Deserializer<R>,
    ) -> Result<Value, serde_json::Error> {
        serde::de::DeserializeSeed::deserialize(self, d)
    }
}

impl<'de> serde::de::Visitor<'de> for TopCheck<'_, '_> {
    type Value = Top<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, a: A) -> Result<Top<'de>, A::Error> {
        let mut top = Top {
            model: Seen::Absent,
            stream: Seen::Absent,
            names_state: false,
            caps: GenerationCaps::default(),
        };
        check_map(self.0, a, |key, a| {
            let capture = key == "model";
            let seen = a.next_value_seed(Check {
                tally: self.0,
                capture,
            })?;
            match key {
                "model" => top.model = seen,
                "stream" => top.stream = seen,
                "background" => {
                    top.caps.background = !matches!(seen, Seen::Null | Seen::Bool(false));
                }
                "store" => {
                    top.caps.unstored = matches!(seen, Seen::Bool(false));
                    top.caps.stateful |= matches!(seen, Seen::Bool(true));
                }
                "prompt" => {
                    top.caps.stateful |= !matches!(seen, Seen::Null);
                    if let Seen::List {
                        len,
                        of_ints: false,
                    } = seen
                    {
                        top.caps.prompts = Some(len as u64);
                    }
                }
                _ => {
                    match seen {
                        Seen::Uint(n) => top.caps.note(key, n),
                        Seen::Null => {}
                        _ => top.caps.note_unreadable(key),
                    }
                    top.names_state |= crate::meta::STATE_KEYS.contains(&key);
                }
            }
            Ok(())
        })?;
        Ok(top)
    }
}

/// The keys of one object, to find a repeat: compared one by one while
/// they are few (most objects), hashed past that.
const FEW_KEYS: usize = 16;

/// Check the entries of an object as [`Unique`] builds them: each key
/// tallied and compared with the others, then its value read by `value`.
fn check_map<'de, A: serde::de::MapAccess<'de>>(
    tally: &Tally<'_>,
    mut a: A,
    mut value: impl FnMut(&str, &mut A) -> Result<(), A::Error>,
) -> Result<(), A::Error> {
    let mut few: smallvec::SmallVec<[Cow<'de, str>; FEW_KEYS]> = smallvec::SmallVec::new();
    let mut many: Option<std::collections::HashSet<Cow<'de, str>>> = None;
    let mut len = 0usize;
    while let Some(key) = a.next_key_seed(CheckKey)? {
        tally.add(key.len())?;
        tally.add(map_growth(len))?;
        len += 1;
        let repeated = match &mut many {
            Some(many) => !many.insert(key.clone()),
            None if few.len() < FEW_KEYS => {
                let repeated = few.contains(&key);
                few.push(key.clone());
                repeated
            }
            None => {
                let mut set: std::collections::HashSet<Cow<'de, str>> = few.drain(..).collect();
                let repeated = !set.insert(key.clone());
                many = Some(set);
                repeated
            }
        };
        if repeated {
            return Err(serde::de::Error::custom(format_args!(
                "duplicate key `{key}`"
            )));
        }
        value(&key, &mut a)?;
    }
    Ok(())
}

/// An object's key, borrowed from the body unless it has escapes.
struct CheckKey;

impl<'de> serde::de::DeserializeSeed<'de> for CheckKey {
    type Value = Cow<'de, str>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Cow<'de, str>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> serde::de::Visitor<'de> for CheckKey {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a key")
    }

    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Borrowed(s))
    }

    fn visit_str<E>(self, s: &str) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Owned(s.to_owned()))
    }
}

/// A value checked as [`Unique`] builds it, tallied, building nothing; a
/// string is kept only when `capture` asks for it.
#[derive(Clone, Copy)]
struct Check<'t, 'c> {
    tally: &'t Tally<'c>,
    capture: bool,
}

impl<'de> serde::de::DeserializeSeed<'de> for Check<'_, '_> {
    type Value = Seen<'de>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Seen<'de>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Check<'_, '_> {
    type Value = Seen<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, a: A) -> Result<Seen<'de>, A::Error> {
        let inner = Check {
            tally: self.tally,
            capture: false,
        };
        check_map(self.tally, a, |_, a| a.next_value_seed(inner).map(drop))?;
        Ok(Seen::Other)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<Seen<'de>, A::Error> {
        // The slots a `Vec<Value>` grows to as `Unique` pushes into it.
        let mut capacity = a.size_hint().unwrap_or(0).min(4096);
        self.tally.add(capacity * SLOT)?;
        let inner = Check {
            tally: self.tally,
            capture: false,
        };
        let mut len = 0usize;
        let mut of_ints = false;
        while let Some(seen) = a.next_element_seed(inner)? {
            if len == 0 {
                of_ints = matches!(seen, Seen::Uint(_));
            }
            len += 1;
            if len > capacity {
                let grown = (capacity * 2).max(len).max(MIN_SLOTS);
                self.tally.add((grown - capacity) * SLOT)?;
                capacity = grown;
            }
        }
        Ok(Seen::List { len, of_ints })
    }

    fn visit_bool<E>(self, b: bool) -> Result<Seen<'de>, E> {
        Ok(Seen::Bool(b))
    }

    fn visit_i64<E>(self, _: i64) -> Result<Seen<'de>, E> {
        Ok(Seen::Other)
    }

    fn visit_u64<E>(self, n: u64) -> Result<Seen<'de>, E> {
        Ok(Seen::Uint(n))
    }

    fn visit_f64<E>(self, _: f64) -> Result<Seen<'de>, E> {
        Ok(Seen::Other)
    }

    fn visit_borrowed_str<E: serde::de::Error>(self, s: &'de str) -> Result<Seen<'de>, E> {
        self.tally.add(s.len())?;
        Ok(if self.capture {
            Seen::Str(Cow::Borrowed(s))
        } else {
            Seen::Other
        })
    }

    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Seen<'de>, E> {
        self.tally.add(s.len())?;
        Ok(if self.capture {
            Seen::Str(Cow::Owned(s.to_owned()))
        } else {
            Seen::Other
        })
    }

    fn visit_unit<E>(self) -> Result<Seen<'de>, E> {
        Ok(Seen::Null)
    }
}

/// The fewest slots a `Vec` of `Value`s allocates (std's `RawVec` for
/// elements of this size).
const MIN_SLOTS: usize = 4;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::full;

    fn req(path: &str, ct: Option<&str>, body: &'static str) -> Request<Body> {
        let mut b = Request::post(path);
        if let Some(ct) = ct {
            b = b.header("content-type", ct);
        }
        b.body(full(body)).unwrap()
    }

    async fn code(r: Request<Body>, limit: usize) -> &'static str {
        parse(r, limit)
            .await
            .err()
            .map(|e| e.code())
            .unwrap_or("ok")
    }

    #[tokio::test]
    async fn a_model_body_with_a_content_coding_is_415() {
        let coded = |encoding: &'static str| {
            let mut r = req("/v1/chat/completions", None, r#"{"model":"m"}"#);
            r.headers_mut().append(
                header::CONTENT_ENCODING,
                http::HeaderValue::from_static(encoding),
            );
            r
        };
        for encoding in ["gzip", "br", "identity, gzip", "x-custom"] {
            let e = parse(coded(encoding), 100).await.unwrap_err();
            assert_eq!(
                (e.status().as_u16(), e.code()),
                (415, "unsupported_media_type")
            );
            assert!(e.to_string().contains(encoding), "{e}");
        }
        for encoding in ["identity", "IDENTITY", ""] {
            assert_eq!(code(coded(encoding), 100).await, "ok", "{encoding:?}");
        }
        // A body the proxy passes on unread keeps its coding.
        let mut other = req("/v1/files", Some("application/octet-stream"), "x");
        other.headers_mut().insert(
            header::CONTENT_ENCODING,
            http::HeaderValue::from_static("gzip"),
        );
        assert_eq!(code(other, 100).await, "ok");
    }

    #[tokio::test]
    async fn bad_inputs_get_their_codes() {
        let p = "/v1/chat/completions";
        assert_eq!(code(req(p, None, "{"), 100).await, "invalid_json");
        assert_eq!(code(req(p, None, "[1]"), 100).await, "invalid_body");
        assert_eq!(code(req(p, None, "{}"), 100).await, "missing_model");
        assert_eq!(
            code(req(p, None, r#"{"model":1}"#), 100).await,
            "missing_model"
        );
        assert_eq!(
            code(req(p, Some("text/plain"), r#"{"model":"m"}"#), 100).await,
            "unsupported_media_type"
        );
        assert_eq!(
            code(
                req(
                    p,
                    Some("application/json; charset=utf-8"),
                    r#"{"model":"m"}"#
                ),
                100
            )
            .await,
            "ok"
        );
        assert_eq!(
            code(
                req(p, Some("application/vnd.api+json"), r#"{"model":"m"}"#),
                100
            )
            .await,
            "ok"
        );
        for (ct, expected) in [
            ("application/json; charset=UTF-8", "ok"),
            ("application/json;charset=\"utf-8\"", "ok"),
            ("application/json; charset=utf8; x=y", "ok"),
            ("application/json; charset=utf-16", "unsupported_media_type"),
            (
                "application/json; charset=\"iso-8859-1\"",
                "unsupported_media_type",
            ),
        ] {
            assert_eq!(
                code(req(p, Some(ct), r#"{"model":"m"}"#), 100).await,
                expected,
                "{ct}"
            );
        }
        // Two content types, whichever they are.
        let mut two = req(p, Some("application/json"), r#"{"model":"m"}"#);
        two.headers_mut()
            .append(header::CONTENT_TYPE, "text/plain".parse().unwrap());
        assert_eq!(code(two, 100).await, "unsupported_media_type");
        assert_eq!(
            code(req(p, None, r#"{"model":"mmmmmmmmmmmmm"}"#), 10).await,
            "request_too_large"
        );
        for stream in [r#""yes""#, "1", "{}"] {
            let body = format!(r#"{{"model":"m","stream":{stream}}}"#);
            let r = Request::post(p).body(crate::full(body)).expect("a request");
            assert_eq!(code(r, 100).await, "unsupported_parameter", "{stream}");
        }
        for stream in ["true", "false", "null"] {
            let body = format!(r#"{{"model":"m","stream":{stream}}}"#);
            let r = Request::post(p).body(crate::full(body)).expect("a request");
            assert_eq!(code(r, 100).await, "ok", "{stream}");
        }
    }

    /// The tally of the check that builds nothing, or its error.
    fn checked(bytes: &[u8]) -> Result<usize, String> {
        tally_or_error(check_object(bytes, None))
    }

    /// The tally of the parse that builds, or its error.
    fn built(bytes: &[u8]) -> Result<usize, String> {
        tally_or_error(object_within(bytes, None))
    }

    fn tally_or_error<T>(outcome: Result<Option<(T, usize)>, Unparsed>) -> Result<usize, String> {
        match outcome {
            Ok(Some((_, built))) => Ok(built),
            Ok(None) => Err("not an object".into()),
            Err(Unparsed::Json(e)) => Err(e.to_string()),
            Err(Unparsed::OverBudget(e)) => Err(e.to_string()),
        }
    }

    #[test]
    fn the_check_refuses_what_the_build_refuses() {
        let many: String = (0..40).map(|i| format!(r#""k{i}":{i},"#)).collect();
        for body in [
            r#"{"model":"m","model":"n"}"#.to_owned(),
            // A key written with an escape is the same key.
            r#"{"model":"m","mod\u0065l":"n"}"#.to_owned(),
            r#"{"model":"m","x":[{"a":1,"b":{"c":1,"c":2}}]}"#.to_owned(),
            // Past the keys compared one by one: hashed.
            format!(r#"{{{many}"k3":0}}"#),
            format!(r#"{{"x":{{{many}"k39":0}}}}"#),
            format!(r#"{{{many}"k40":0}}"#),
            r#"{"model":"m"} x"#.to_owned(),
            r#"{"model":"m","x":"\ud800"}"#.to_owned(),
            r#"{"model":"m","x":"\u00ff\n"}"#.to_owned(),
            r#"{"model":"m","x":1e999}"#.to_owned(),
            format!("{}{}", "{\"a\":[".repeat(200), "]}".repeat(200)),
            "[1]".to_owned(),
            "{".to_owned(),
        ] {
            let (check, build) = (checked(body.as_bytes()), built(body.as_bytes()));
            assert_eq!(
                check.is_ok(),
                build.is_ok(),
                "{body}: {check:?} / {build:?}"
            );
            assert_eq!(check, build, "{body}");
        }
        // Bytes that are not UTF-8 inside a string: refused by both, with
        // serde_json's own (syntax) error.
        let mut bytes = br#"{"model":"m","x":""#.to_vec();
        bytes.extend_from_slice(&[0xff, b'"', b'}']);
        assert_eq!(checked(&bytes), built(&bytes));
        assert!(checked(&bytes).is_err());
    }

    #[tokio::test]
    async fn a_body_that_is_not_utf8_is_malformed_json_or_passed_on() {
        let mut bytes = br#"{"model":"m","x":""#.to_vec();
        bytes.extend_from_slice(&[0xff, b'"', b'}']);
        let post = |path: &str| {
            Request::post(path)
                .body(full(Bytes::from(bytes.clone())))
                .expect("a request")
        };
        assert_eq!(
            code(post("/v1/chat/completions"), 1000).await,
            "invalid_json"
        );
        // Not JSON on a passthrough route: on to the upstream as it is.
        let passed = parse(post("/v1/batches"), 1000).await.unwrap();
        let body = passed.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, bytes);
    }

    #[tokio::test]
    async fn built_eagerly_or_not_a_body_gets_the_same_answer() {
        let bodies = [
            "{",
            "[1]",
            "{}",
            r#"{"model":1}"#,
            r#"{"model":""}"#,
            r#"{"model":"m"}"#,
            r#"{"model":"m","stream":"yes"}"#,
            r#"{"model":"m","stream":null}"#,
            r#"{"model":"m","stream":true,"stream":true}"#,
            r#"{"model":"m","x":[{"a":1,"a":2}]}"#,
            r#"{"model":"m","input":"x"} 1"#,
            r#"{"model":"mmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmm"}"#,
            r#"{"model":"m","max_tokens":100,"max_output_tokens":7,"n":2,"best_of":3}"#,
            r#"{"model":"m","max_tokens":-1,"n":1.5,"best_of":"4","max_completion_tokens":18446744073709551615}"#,
            r#"{"model":"m","x":{"max_tokens":5,"n":2},"previous_response_id":9}"#,
            r#"{"model":"m","background":false}"#,
            r#"{"model":"m","background":null}"#,
            r#"{"model":"m","background":"true"}"#,
            r#"{"model":"m","background":1,"x":{"background":true}}"#,
        ];
        for body in bodies {
            let mut answers = Vec::new();
            for eager in [false, true] {
                let budget = BodyBudget::new(1 << 10);
                let r = req("/v1/chat/completions", None, body);
                let parsed = parse_claimed(r, 50, Some(budget.claim()), eager).await;
                answers.push(match parsed {
                    Ok(r) => {
                        let meta = r.extensions().get::<RequestMeta>().unwrap();
                        assert_eq!(meta.is_built(), eager, "{body}");
                        let json = meta.json().expect("built when asked");
                        format!(
                            "ok {:?} {} {} {} {:?}",
                            meta.model(),
                            meta.is_stream(),
                            meta.names_state(),
                            json.len(),
                            meta.generation_caps(),
                        )
                    }
                    Err(e) => e.to_string(),
                });
            }
            assert_eq!(answers[0], answers[1], "{body}");
        }
    }

    #[tokio::test]
    async fn a_model_body_is_built_only_when_asked_for() {
        let body = r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
        let parsed = parse(req("/v1/chat/completions", None, body), 1000)
            .await
            .unwrap();
        let meta = parsed.extensions().get::<RequestMeta>().unwrap().clone();
        assert_eq!((meta.model(), meta.is_stream()), (Some("m"), true));
        let copy = meta.clone();
        // Built once, for every copy.
        let json = meta.json().expect("built");
        assert_eq!(json["messages"][0]["content"], "hi");
        assert!(std::ptr::eq(json, copy.json().unwrap()));
        assert_eq!(meta.body_for_upstream().unwrap(), body.as_bytes());
        // An edit is the copy's own.
        let mut edited = copy.clone();
        edited.set_model("n");
        assert_eq!(meta.json().unwrap()["model"], "m");
        let sent: Value = serde_json::from_slice(&edited.body_for_upstream().unwrap()).unwrap();
        assert_eq!(
            (&sent["model"], &sent["stream"]),
            (&Value::from("n"), &Value::from(true))
        );
    }

    #[tokio::test]
    async fn the_check_learns_the_generation_caps_and_an_edit_changes_them() {
        let body = r#"{"model":"m","max_tokens":100,"max_output_tokens":7,"n":2,"best_of":3,"x":{"n":9,"store":false},"store":false}"#;
        let parsed = parse(req("/v1/responses", None, body), 1000).await.unwrap();
        let mut meta = parsed.extensions().get::<RequestMeta>().unwrap().clone();
        let learned = GenerationCaps {
            max_tokens: Some(100),
            choices: Some(3),
            background: false,
            unreadable: false,
            unstored: true,
            stateful: false,
            prompts: None,
        };
        assert_eq!(meta.generation_caps(), learned);
        assert!(!meta.is_built());
        assert_eq!(GenerationCaps::of(meta.json().unwrap()), learned);
        let json = meta.json_mut().unwrap();
        json.insert("max_tokens".into(), Value::from(900));
        json.insert("background".into(), Value::from(true));
        json.insert("store".into(), Value::from(true));
        let edited = meta.generation_caps();
        assert_eq!(
            (edited.max_tokens, edited.background, edited.unstored),
            (Some(900), true, false)
        );
        // A cap or count a lax server reads as a number, which the caps
        // cannot: unreadable, checked or built; `null` is no value.
        for (body, unreadable) in [
            (r#"{"model":"m","n":100.0}"#, true),
            (r#"{"model":"m","max_tokens":"100000"}"#, true),
            (r#"{"model":"m","best_of":-1}"#, true),
            (r#"{"model":"m","max_tokens":null,"x":1.5}"#, false),
        ] {
            let parsed = parse(req("/v1/chat/completions", None, body), 1000)
                .await
                .unwrap();
            let meta = parsed.extensions().get::<RequestMeta>().unwrap();
            assert_eq!(meta.generation_caps().unreadable, unreadable, "{body}");
            let built = GenerationCaps::of(meta.json().unwrap());
            assert_eq!(built.unreadable, unreadable, "{body}");
        }
        // The prompts of a completions `prompt` array: checked or built.
        for (body, prompts) in [
            (r#"{"model":"m","prompt":["a","b","c"]}"#, Some(3)),
            (r#"{"model":"m","prompt":[[1,2],[3]]}"#, Some(2)),
            (r#"{"model":"m","prompt":[1,2,3]}"#, None),
            (r#"{"model":"m","prompt":"a"}"#, None),
            (r#"{"model":"m","prompt":[]}"#, Some(0)),
        ] {
            let parsed = parse(req("/v1/completions", None, body), 1000)
                .await
                .unwrap();
            let meta = parsed.extensions().get::<RequestMeta>().unwrap();
            assert_eq!(meta.generation_caps().prompts, prompts, "{body}");
            let built = GenerationCaps::of(meta.json().unwrap());
            assert_eq!(built.prompts, prompts, "{body}");
        }
        // Asking to be kept, or for a kept prompt: checked or built.
        for (body, stateful) in [
            (r#"{"model":"m","store":true}"#, true),
            (r#"{"model":"m","prompt":{"id":"pmpt_1"}}"#, true),
            (r#"{"model":"m","store":false,"prompt":null}"#, false),
            (r#"{"model":"m","x":{"store":true}}"#, false),
        ] {
            let parsed = parse(req("/v1/responses", None, body), 1000).await.unwrap();
            let meta = parsed.extensions().get::<RequestMeta>().unwrap();
            assert_eq!(meta.generation_caps().stateful, stateful, "{body}");
            assert_eq!(meta.needs_kept_state(), stateful, "{body}");
            let built = GenerationCaps::of(meta.json().unwrap());
            assert_eq!(built.stateful, stateful, "{body}");
        }
    }

    proptest::proptest! {
        /// The check that builds nothing tallies what the build holds.
        #[test]
        fn the_check_tallies_as_the_build(value in crate::canonical::tests::value_strategy()) {
            let mut object = Map::new();
            object.insert("model".into(), Value::from("m"));
            object.insert("v".into(), value);
            let bytes = serde_json::to_vec(&object).unwrap();
            proptest::prop_assert_eq!(checked(&bytes), built(&bytes));
        }

        /// Without repeats, the same value serde_json's own parse makes.
        #[test]
        fn parses_as_serde_json_does(value in crate::canonical::tests::value_strategy()) {
            let bytes = serde_json::to_vec(&value).unwrap();
            let tally = Tally {
                built: Cell::new(0),
                base: 0,
                held: Cell::new(0),
                claim: None,
                over: Cell::new(false),
            };
            let ours = build(&bytes, &tally).unwrap();
            proptest::prop_assert_eq!(ours, value);
        }
    }

    /// The body `{"model":"m","x":[UNIT,UNIT,…,0]}` of about `len` bytes.
    fn body_of(unit: &str, len: usize) -> String {
        let mut body = String::from(r#"{"model":"m","x":["#);
        while body.len() < len {
            body.push_str(unit);
        }
        body.push_str("0]}");
        body
    }

    #[test]
    fn the_tally_follows_what_serde_json_allocates() {
        // Heap bytes per body byte of serde_json's `Value` (`preserve_order`)
        // for 1 MiB bodies of these units, measured with a counting global
        // allocator (not possible here: the workspace forbids `unsafe`).
        for (unit, measured) in [
            ("0,", 36.0),
            (r#"{"":0},"#, 70.0),
            (
                r#"{"role":"user","content":"Hello there, how are you doing today? Tell me a story."},"#,
                6.3,
            ),
            (r#"{"a":1,"b":2,"c":3,"d":4,"e":5,"f":6,"g":7},"#, 21.0),
            (
                r#"{"a":1,"b":2,"c":3,"d":4,"e":5,"f":6,"g":7,"h":1,"i":1,"j":1,"k":1,"l":1,"m":1,"n":1,"o":1,"p":1,"q":1,"r":1,"s":1,"t":1},"#,
                27.6,
            ),
        ] {
            let body = body_of(unit, 1 << 20);
            let (_, built) = object_within(body.as_bytes(), None)
                .ok()
                .flatten()
                .expect("an object");
            let ratio = built as f64 / body.len() as f64;
            assert!(
                (ratio / measured - 1.0).abs() < 0.15,
                "{unit}: {ratio:.1} bytes built per byte, measured {measured}"
            );
        }
    }

    #[tokio::test]
    async fn the_budget_counts_what_a_body_is_parsed_into() {
        let budget = BodyBudget::new(1 << 20);
        // 64 KiB of bytes that become ~6 MiB of objects: refused, though
        // the bytes fit, and nothing stays held.
        let heavy = body_of(r#"{"":0},"#, 64 << 10);
        let post = |body: String| {
            Request::post("/v1/chat/completions")
                .body(full(body))
                .expect("a request")
        };
        // More than the whole budget: 413, not a 503 to retry for ever.
        let err = parse_within(post(heavy), 1 << 20, Some(&budget))
            .await
            .unwrap_err();
        assert_eq!(err.code(), "request_too_large");
        assert_eq!(err.status(), 413);
        assert_eq!(budget.in_use(), 0);
        // Would fit alone, not beside what another request holds: 503.
        let text = |len: usize| format!(r#"{{"model":"m","input":"{}"}}"#, "x".repeat(len));
        let other = parse_within(post(text(300 << 10)), 1 << 20, Some(&budget))
            .await
            .unwrap();
        assert!(budget.in_use() > 600 << 10, "{}", budget.in_use());
        let err = parse_within(post(text(300 << 10)), 1 << 20, Some(&budget))
            .await
            .unwrap_err();
        assert_eq!(err.code(), "server_overloaded");
        drop(other);
        assert_eq!(budget.in_use(), 0);
        // The budget held while a value is built stays near what it holds:
        // a refused parse never holds more than the budget.
        let r = parse_within(post(text(300 << 10)), 1 << 20, Some(&budget)).await;
        assert!(r.is_ok());
        drop(r);
        // A plain body holds its bytes and what they were parsed into while
        // the request lives, and gives both back.
        let plain = format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":"{}"}}]}}"#,
            "x".repeat(10_000)
        );
        let r = Request::post("/v1/chat/completions")
            .body(full(plain.clone()))
            .expect("a request");
        let parsed = parse_within(r, 1 << 20, Some(&budget)).await.unwrap();
        let held = budget.in_use();
        assert!(
            held > 2 * plain.len() && held < 3 * plain.len(),
            "{held} held for {} bytes",
            plain.len()
        );
        drop(parsed);
        assert_eq!(budget.in_use(), 0);
    }

    /// A body that comes in these frames.
    struct Frames(std::collections::VecDeque<Bytes>);

    impl http_body::Body for Frames {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.0.pop_front().map(|b| Ok(http_body::Frame::data(b))))
        }
    }

    #[tokio::test]
    async fn a_body_in_many_frames_is_counted_once() {
        let body = format!(r#"{{"model":"m","x":"{}"}}"#, "y".repeat(970));
        assert_eq!(body.len(), 990);
        let frames = body
            .as_bytes()
            .chunks(100)
            .map(Bytes::copy_from_slice)
            .collect();
        let budget = BodyBudget::new(1 << 20);
        let r = Request::post("/v1/chat/completions")
            .body(Frames(frames))
            .expect("a request");
        let parsed = parse_within(r, 1000, Some(&budget)).await.unwrap();
        let meta = parsed.extensions().get::<RequestMeta>().unwrap();
        assert_eq!(meta.original_body().unwrap(), body.as_bytes());
        // The bytes and the value (an object's leaf, a 970-byte string…).
        assert!(budget.in_use() < 990 + 990 + 700, "{}", budget.in_use());
    }

    #[tokio::test]
    async fn a_repeated_key_is_refused_at_any_depth() {
        let body = r#"{"model":"allowed","input":"x","model":"other"}"#;
        let err = parse(req("/v1/responses", None, body), 1000)
            .await
            .unwrap_err();
        assert_eq!(err.code(), "invalid_json");
        assert!(err.to_string().contains("duplicate key `model`"), "{err}");
        // On a passthrough route too (its model still decides routing).
        let body = r#"{"model":"a","model":"b"}"#;
        assert_eq!(
            code(req("/v1/batches", None, body), 1000).await,
            "invalid_json"
        );
        // A body that is not JSON there goes on as it is.
        assert_eq!(code(req("/v1/batches", None, "{"), 1000).await, "ok");
        // At any depth: a message's content read twice could key the cache
        // on one and be answered for the other.
        let nested = r#"{"model":"m","input":[{"role":"user","content":"a","content":"b"}]}"#;
        assert_eq!(
            code(req("/v1/responses", None, nested), 1000).await,
            "invalid_json"
        );
        for not_object in ["[1,{\"a\":1}]", "\"s\"", "1", "true", "null"] {
            assert_eq!(
                parse_object(not_object.as_bytes()).unwrap_err().code(),
                "invalid_body"
            );
        }
    }

    #[tokio::test]
    async fn content_length_over_limit_is_refused_before_reading() {
        let r = Request::post("/v1/embeddings")
            .header("content-length", "1000000")
            .body(full(""))
            .unwrap();
        assert_eq!(code(r, 100).await, "request_too_large");
    }

    #[tokio::test]
    async fn passthrough_json_learns_model() {
        let r = parse(req("/v1/files", None, r#"{"model":"m"}"#), 100)
            .await
            .unwrap();
        let meta = r.extensions().get::<RequestMeta>().unwrap();
        assert_eq!(meta.endpoint(), Endpoint::Passthrough);
        assert_eq!(meta.model(), Some("m"));
    }
}

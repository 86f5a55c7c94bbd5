use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use serde_json::{Map, Value};

use crate::Endpoint;

/// Who is calling, once the auth layer has decided: the configured key's name.
/// Never the key itself.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Identity {
    /// The key's configured name, e.g. `team-a`.
    pub name: Arc<str>,
}

/// Where the auth layer writes the name of the key a request came with,
/// for a layer in front of it that reads it once the request is done (the
/// proxy's access log): put into the request's extensions by that layer,
/// shared by its clones. The request itself is handed on by value, and
/// with it the [`RequestMeta`] that carries its [`Identity`].
#[derive(Clone, Debug, Default)]
pub struct CallerSlot(Arc<OnceLock<Arc<str>>>);

impl CallerSlot {
    /// An empty slot.
    pub fn new() -> Self {
        Self::default()
    }

    /// Record the key's name (the first name written stays).
    pub fn set(&self, name: &Arc<str>) {
        let _ = self.0.set(name.clone());
    }

    /// The key's name, once written.
    pub fn get(&self) -> Option<&Arc<str>> {
        self.0.get()
    }
}

/// Whether the `input` of a Responses body names an item by id: what it
/// holds is upstream state the body does not show (the cache must not key
/// on the body alone; a token estimate cannot see it). A reference is
/// `{"type": "item_reference", "id": …}`, and its `type` may be left out
/// or `null` (`{"id": "msg_…"}`); an item without a `type` that has a
/// `role` or `content` is a message, not a reference.
pub fn references_stored_items(json: &serde_json::Map<String, serde_json::Value>) -> bool {
    use serde_json::Value;
    let Some(Value::Array(input)) = json.get("input") else {
        return false;
    };
    input.iter().any(|item| match item.get("type") {
        Some(Value::String(kind)) => kind == "item_reference",
        None | Some(Value::Null) => {
            item.get("id").is_some_and(Value::is_string)
                && item.get("role").is_none()
                && item.get("content").is_none()
        }
        Some(_) => false,
    })
}

/// The models a caller may use, when its key limits them: the auth layer
/// puts it in the request's extensions, so that a later layer that picks a
/// model itself (the balancer's fallbacks) stays within it.
#[derive(Clone, Debug)]
pub struct ModelAllowlist(pub Arc<std::collections::HashSet<String>>);

impl ModelAllowlist {
    /// Whether `model` is on the list.
    pub fn allows(&self, model: &str) -> bool {
        self.0.contains(model)
    }
}

/// What the parse layer learned about a request, read by every later layer
/// from the request's extensions.
///
/// The JSON body is checked once, in the parse layer (well-formed, an
/// object, no key repeated, within the body budget), and built into a
/// value at most once: when a layer first asks for it
/// ([`RequestMeta::json`]), shared by every clone of the metadata. A
/// request no layer reads (plain routing reads only `model` and `stream`,
/// learned by the check) is never built at all. A layer that must change
/// the body (a fallback `model`, `stream_options.include_usage`) edits the
/// parsed object through [`RequestMeta::json_mut`]; the upstream client
/// then sends [`RequestMeta::body_for_upstream`], which re-serialises only
/// an edited body and otherwise hands back the client's bytes unchanged.
#[derive(Clone, Debug)]
pub struct RequestMeta {
    endpoint: Endpoint,
    model: Option<Arc<str>>,
    stream: bool,
    body: Option<Bytes>,
    json: Option<Arc<Tree>>,
    /// The body has a top-level `previous_response_id` or `conversation`.
    names_state: bool,
    /// The body's generation caps, as parsed (see
    /// [`RequestMeta::generation_caps`]).
    caps: GenerationCaps,
    edited: bool,
    identity: Option<Identity>,
    budget: Option<crate::BodyBudget>,
    /// The cache layer passed the request on ([`RequestMeta::mark_passed_cache`]).
    passed_cache: bool,
}

/// What a model body's top-level fields ask the model to generate: the
/// largest completion cap it names (`max_tokens`, `max_completion_tokens`,
/// `max_output_tokens`: a body may name several, and which one an upstream
/// honours is its own business), the most completions it asks for (`n`,
/// or completions' `best_of` when larger), and whether it asks to go on
/// generating after its answer (`background`). A cap or count that is not
/// a non-negative integer counts as absent. The parse layer's check learns
/// them without building the body, so that a layer that reserves tokens
/// (auth's token limits) need not build it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GenerationCaps {
    /// The largest completion cap named.
    pub max_tokens: Option<u64>,
    /// The most completions asked for.
    pub choices: Option<u64>,
    /// A `background` that is there and neither `null` nor `false` (a lax
    /// server may read `"true"` or `1` as true).
    pub background: bool,
    /// A cap or count that is there but neither an unsigned integer nor
    /// `null` (`100.0`, `"100"`: a lax server, pydantic's by default,
    /// reads either as 100), which the caps above cannot count.
    pub unreadable: bool,
    /// `"store": false`: the upstream keeps no answer (a Responses id of
    /// it can be neither fetched nor continued).
    pub unstored: bool,
    /// `"store": true`, or a `prompt` that is neither absent nor `null`
    /// (in a Responses body, a prompt template kept upstream; in a
    /// completions body, the prompt itself): in a Responses body, asks for
    /// what only an upstream that keeps responses gives (see
    /// [`RequestMeta::needs_kept_state`]).
    pub stateful: bool,
    /// How many prompts a completions `prompt` array holds (one of
    /// strings, or of token-id arrays: each is generated for, `n` times;
    /// an array of token ids is one prompt, and counts as absent).
    pub prompts: Option<u64>,
}

impl GenerationCaps {
    /// The caps of a parsed body.
    pub fn of(json: &Map<String, Value>) -> Self {
        let mut caps = GenerationCaps::default();
        for (key, value) in json {
            match value.as_u64() {
                Some(n) => caps.note(key, n),
                None if !value.is_null() => caps.note_unreadable(key),
                None => {}
            }
        }
        caps.background = json
            .get("background")
            .is_some_and(|b| !matches!(b, Value::Null | Value::Bool(false)));
        caps.unstored = json.get("store") == Some(&Value::Bool(false));
        caps.stateful = json.get("store") == Some(&Value::Bool(true))
            || json.get("prompt").is_some_and(|p| !p.is_null());
        caps.prompts = match json.get("prompt") {
            Some(Value::Array(prompts)) if !prompts.first().is_some_and(Value::is_u64) => {
                Some(prompts.len() as u64)
            }
            _ => None,
        };
        caps
    }

    /// Note the top-level field `key`, whose value is neither an unsigned
    /// integer nor `null`: unreadable if it is a cap or a count.
    pub(crate) fn note_unreadable(&mut self, key: &str) {
        self.unreadable |= self.slot(key).is_some();
    }

    /// Count the top-level field `key`, whose value is the integer `n`.
    pub(crate) fn note(&mut self, key: &str, n: u64) {
        if let Some(slot) = self.slot(key) {
            *slot = Some(slot.map_or(n, |m| m.max(n)));
        }
    }

    /// Where the top-level field `key` counts: a completion cap, or a
    /// number of completions; `None` for any other field.
    fn slot(&mut self, key: &str) -> Option<&mut Option<u64>> {
        match key {
            "max_tokens" | "max_completion_tokens" | "max_output_tokens" => {
                Some(&mut self.max_tokens)
            }
            "n" | "best_of" => Some(&mut self.choices),
            _ => None,
        }
    }
}

/// Whether a body names server state (see [`RequestMeta::names_state`]).
fn names_state(json: &Map<String, Value>) -> bool {
    STATE_KEYS.iter().any(|key| json.contains_key(*key))
}

/// The top-level keys by which a Responses request names state that lives
/// on one upstream.
pub(crate) const STATE_KEYS: [&str; 2] = ["previous_response_id", "conversation"];

/// The body's value, built on first use from the body's bytes (`None` in
/// it: the bytes did not parse as an object, which the parse layer's check
/// rules out).
type Tree = OnceLock<Option<Map<String, Value>>>;

/// `body`, a JSON object, with the field `name` set to `value` added at
/// its end and every other byte as it was; `None` when it does not end as
/// an object does.
fn with_field(body: &[u8], name: &str, value: &Value) -> Option<Bytes> {
    // JSON's whitespace: a checked body holds no other outside its strings.
    let blank = |b: &u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r');
    let close = body.iter().rposition(|b| !blank(b))?;
    if body[close] != b'}' {
        return None;
    }
    // Just after the opening brace, when the object is empty: a `{` before
    // the closing `}` of the top level can only be its own.
    let before = body[..close].iter().rposition(|b| !blank(b))?;
    let empty = body[before] == b'{';
    let mut out = Vec::with_capacity(body.len() + name.len() + 48);
    out.extend_from_slice(&body[..close]);
    if !empty {
        out.push(b',');
    }
    serde_json::to_writer(&mut out, name).ok()?;
    out.push(b':');
    serde_json::to_writer(&mut out, value).ok()?;
    out.extend_from_slice(&body[close..]);
    Some(Bytes::from(out))
}

/// `body`, a JSON object, with its top-level `model` string replaced by
/// `model` and every other byte as it was; `None` when it is not an object
/// with a string `model`.
fn with_model(body: &[u8], model: &str) -> Option<Bytes> {
    use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
    use serde_json::value::RawValue;

    /// The raw value of a top-level `model`.
    struct Model<'a>(Option<&'a RawValue>);
    impl<'de> Deserialize<'de> for Model<'de> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct Find;
            impl<'de> Visitor<'de> for Find {
                type Value = Model<'de>;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("a JSON object")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Model<'de>, A::Error> {
                    let mut found = None;
                    while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                        let value: &'de RawValue = map.next_value()?;
                        if key == "model" {
                            found = Some(value);
                        }
                    }
                    Ok(Model(found))
                }
            }
            d.deserialize_map(Find)
        }
    }

    let raw = serde_json::from_slice::<Model<'_>>(body).ok()?.0?.get();
    if !raw.starts_with('"') {
        return None;
    }
    // Where the value lies in the body (it is borrowed from it).
    let start = (raw.as_ptr() as usize).checked_sub(body.as_ptr() as usize)?;
    let end = start
        .checked_add(raw.len())
        .filter(|&end| end <= body.len())?;
    let name = serde_json::to_vec(model).ok()?;
    let mut out = Vec::with_capacity(body.len() - raw.len() + name.len());
    out.extend_from_slice(&body[..start]);
    out.extend_from_slice(&name);
    out.extend_from_slice(&body[end..]);
    Some(Bytes::from(out))
}

impl RequestMeta {
    /// Metadata for a request whose JSON body was parsed into `json`.
    pub fn parsed(endpoint: Endpoint, body: Bytes, json: Map<String, Value>) -> Self {
        let model = json.get("model").and_then(Value::as_str).map(Arc::from);
        let stream = json.get("stream").and_then(Value::as_bool).unwrap_or(false);
        RequestMeta {
            endpoint,
            model,
            stream,
            body: Some(body),
            names_state: names_state(&json),
            caps: GenerationCaps::of(&json),
            json: Some(Arc::new(OnceLock::from(Some(json)))),
            edited: false,
            identity: None,
            budget: None,
            passed_cache: false,
        }
    }

    /// Metadata for a request whose JSON body has been checked (a JSON
    /// object without repeated keys, see [`crate::parse_object`]) but not
    /// built: [`RequestMeta::json`] builds it when first asked. The check
    /// found its `model` and `stream`, whether it
    /// [names state](RequestMeta::names_state), and its
    /// [generation caps](RequestMeta::generation_caps).
    pub fn checked(
        endpoint: Endpoint,
        body: Bytes,
        model: Option<Arc<str>>,
        stream: bool,
        names_state: bool,
        caps: GenerationCaps,
    ) -> Self {
        RequestMeta {
            endpoint,
            model,
            stream,
            body: Some(body),
            names_state,
            caps,
            json: Some(Arc::new(OnceLock::new())),
            edited: false,
            identity: None,
            budget: None,
            passed_cache: false,
        }
    }

    /// Metadata for a request whose body (if any) is not buffered: it travels
    /// in the request itself and is streamed to the upstream as it arrives.
    pub fn unbuffered(endpoint: Endpoint) -> Self {
        RequestMeta {
            endpoint,
            model: None,
            stream: false,
            body: None,
            json: None,
            names_state: false,
            caps: GenerationCaps::default(),
            edited: false,
            identity: None,
            budget: None,
            passed_cache: false,
        }
    }

    /// Which API the request speaks.
    pub fn endpoint(&self) -> Endpoint {
        self.endpoint
    }

    /// The body's `model`, if it has one.
    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    /// The body's `model` as a shared string, if it has one.
    pub fn model_arc(&self) -> Option<&Arc<str>> {
        self.model.as_ref()
    }

    /// Whether the client asked for a streamed answer (`"stream": true`).
    pub fn is_stream(&self) -> bool {
        self.stream
    }

    /// Whether the body has a top-level `previous_response_id` or
    /// `conversation` key (whatever its value): a Responses request that
    /// may continue state kept on one upstream. One without either is
    /// routed without building its body.
    pub fn names_state(&self) -> bool {
        self.names_state
    }

    /// Whether a Responses request needs an upstream that keeps responses:
    /// it [names state](RequestMeta::names_state) (a state key that is not
    /// `null`), a kept prompt or kept items (an `item_reference` in
    /// `input`), or asks to be kept (`"store": true`) or to run in the
    /// `background`. An upstream that reaches the Responses API by
    /// translation from chat completions refuses such a request. May build
    /// the body.
    pub fn needs_kept_state(&self) -> bool {
        let caps = self.generation_caps();
        self.endpoint == Endpoint::Responses
            && (self.names_state_with_a_value()
                || caps.stateful
                || caps.background
                || self.json().is_some_and(references_stored_items))
    }

    /// Whether a state key the body has holds a value (`null` is none, as
    /// for the translation, the cache and the pin). Builds the body only
    /// when it [names state](RequestMeta::names_state).
    fn names_state_with_a_value(&self) -> bool {
        self.names_state
            && self.json().is_some_and(|json| {
                STATE_KEYS
                    .iter()
                    .any(|key| json.get(*key).is_some_and(|v| !v.is_null()))
            })
    }

    /// What the body asks the model to generate ([`GenerationCaps`]):
    /// learned by the parse layer's check, or read again from the body
    /// once a layer has edited it.
    pub fn generation_caps(&self) -> GenerationCaps {
        match self.json.as_deref().and_then(OnceLock::get) {
            Some(Some(json)) if self.edited => GenerationCaps::of(json),
            _ => self.caps,
        }
    }

    /// Whether the body was read as a JSON object (checked, or built):
    /// whether [`RequestMeta::json`] has a body to give, without building it.
    pub fn has_json_body(&self) -> bool {
        self.json.is_some()
    }

    /// The parsed body, when the request had a JSON body (built now, if
    /// no layer has asked for it before).
    pub fn json(&self) -> Option<&Map<String, Value>> {
        let tree = self.json.as_deref()?;
        tree.get_or_init(|| crate::parse::object_tree(self.body.as_deref()?))
            .as_ref()
    }

    /// Whether the body's value has been built (a layer has asked for
    /// it), for tests and diagnostics: a request no layer reads is never
    /// built.
    pub fn is_built(&self) -> bool {
        self.json
            .as_deref()
            .is_some_and(|tree| tree.get().is_some())
    }

    /// The parsed body for editing; marks the body as edited so that it is
    /// re-serialised before it is sent. `None` when the body was not parsed.
    /// The edit is this metadata's own: clones made before it keep the
    /// client's body.
    pub fn json_mut(&mut self) -> Option<&mut Map<String, Value>> {
        self.json()?;
        let tree = self.json.as_mut()?;
        self.edited = true;
        Arc::make_mut(tree).get_mut()?.as_mut()
    }

    /// Replace the body's `model` (a fallback, an upstream's own name for
    /// the model), keeping metadata and body in step. A body no layer has
    /// edited keeps every other byte as the client sent it (the model's
    /// string alone is replaced in its bytes): a re-serialised body keeps
    /// its keys' order, but not its numbers' spelling (`1e3` comes out
    /// `1000.0`, an integer past 64 bits as the nearest float) nor its
    /// whitespace. An edited body is edited once more, and re-serialised.
    pub fn set_model(&mut self, model: &str) {
        if !self.edited
            && let Some(spliced) = self.body.as_deref().and_then(|b| with_model(b, model))
        {
            self.body = Some(spliced);
            self.spliced(|json| {
                json.insert("model".to_owned(), Value::String(model.to_owned()));
            });
        } else if let Some(json) = self.json_mut() {
            json.insert("model".to_owned(), Value::String(model.to_owned()));
        }
        self.model = Some(Arc::from(model));
    }

    /// Add the top-level field `name`, set to `value`, to a body that does
    /// not have it: the caller has read the body (a field it had would be
    /// repeated in an unedited one). A body no layer has edited keeps every
    /// other byte as the client sent it (the field goes in before the
    /// object's closing brace, and nothing is re-serialised); an edited one
    /// gets it in its parsed object. `false` when the request has no JSON
    /// body.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use llm_proxy_core::{Endpoint, RequestMeta};
    ///
    /// let body = br#"{"model": "m", "stream": true}"#;
    /// let json = serde_json::from_slice(body).unwrap();
    /// let mut meta = RequestMeta::parsed(Endpoint::ChatCompletions, Bytes::from_static(body), json);
    /// assert!(meta.add_field("stream_options", &serde_json::json!({"include_usage": true})));
    /// assert_eq!(
    ///     meta.body_for_upstream().unwrap(),
    ///     r#"{"model": "m", "stream": true,"stream_options":{"include_usage":true}}"#
    /// );
    /// assert!(!meta.is_edited());
    /// assert_eq!(meta.json().unwrap()["stream_options"]["include_usage"], true);
    /// ```
    pub fn add_field(&mut self, name: &str, value: &Value) -> bool {
        if !self.edited
            && let Some(spliced) = self
                .body
                .as_deref()
                .and_then(|b| with_field(b, name, value))
        {
            self.body = Some(spliced);
            self.spliced(|json| {
                json.insert(name.to_owned(), value.clone());
            });
            return true;
        }
        match self.json_mut() {
            Some(json) => {
                json.insert(name.to_owned(), value.clone());
                true
            }
            None => false,
        }
    }

    /// Keep the body's value in step with bytes just spliced: a built one
    /// gets the same `edit` (it then equals the new bytes' value, and is not
    /// built again), an unbuilt one is built from the new bytes should a
    /// layer ask. The body does not count as edited.
    fn spliced(&mut self, edit: impl FnOnce(&mut Map<String, Value>)) {
        let Some(tree) = self.json.as_mut() else {
            return;
        };
        if tree.get().is_some() {
            if let Some(json) = Arc::make_mut(tree).get_mut().and_then(Option::as_mut) {
                edit(json);
            }
        } else {
            // A fresh one: clones made before share the old, which would
            // be built from their own (old) bytes.
            *tree = Arc::new(OnceLock::new());
        }
    }

    /// Ask the upstream for a streamed answer's usage chunk: set
    /// `stream_options.include_usage` to `true`. `absent`: the caller read
    /// the body, and it has no `stream_options`; the field is then added to
    /// its bytes ([`RequestMeta::add_field`]) without the body being built.
    /// `false` when the body's `stream_options` is something other than an
    /// object or `null` (left to the upstream to judge), or there is no JSON
    /// body.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use llm_proxy_core::{Endpoint, RequestMeta};
    ///
    /// let body = br#"{"model":"m","stream":true,"stream_options":null}"#;
    /// let json = serde_json::from_slice(body).unwrap();
    /// let mut meta = RequestMeta::parsed(Endpoint::ChatCompletions, Bytes::from_static(body), json);
    /// assert!(meta.ask_for_stream_usage(false));
    /// assert_eq!(meta.json().unwrap()["stream_options"]["include_usage"], true);
    /// ```
    pub fn ask_for_stream_usage(&mut self, absent: bool) -> bool {
        if absent {
            return self.add_field(
                "stream_options",
                &Value::Object(Map::from_iter([(
                    "include_usage".to_owned(),
                    Value::Bool(true),
                )])),
            );
        }
        let Some(json) = self.json_mut() else {
            return false;
        };
        let options = json
            .entry("stream_options")
            .or_insert_with(|| Value::Object(Map::new()));
        if options.is_null() {
            *options = Value::Object(Map::new());
        }
        match options.as_object_mut() {
            Some(options) => {
                options.insert("include_usage".into(), Value::Bool(true));
                true
            }
            None => false,
        }
    }

    /// Turn the request into one of another API (the translation layer does
    /// this): the endpoint and the whole parsed body are replaced, `model` and
    /// `stream` are read again from the new body, and the body counts as
    /// edited, so [`RequestMeta::body_for_upstream`] serialises the new one.
    pub fn translate_to(&mut self, endpoint: Endpoint, json: Map<String, Value>) {
        if let Some(model) = json.get("model").and_then(Value::as_str) {
            self.model = Some(Arc::from(model));
        }
        self.stream = json.get("stream").and_then(Value::as_bool).unwrap_or(false);
        self.endpoint = endpoint;
        self.names_state = names_state(&json);
        self.json = Some(Arc::new(OnceLock::from(Some(json))));
        self.edited = true;
    }

    /// Whether a layer has edited the parsed body.
    pub fn is_edited(&self) -> bool {
        self.edited
    }

    /// The client's body bytes exactly as received, when buffered.
    pub fn original_body(&self) -> Option<&Bytes> {
        self.body.as_ref()
    }

    /// The bytes to send upstream: the client's bytes unchanged, or the edited
    /// object serialised once. `None` when the body is not buffered.
    pub fn body_for_upstream(&self) -> Option<Bytes> {
        match (self.edited, self.json.as_deref().and_then(OnceLock::get)) {
            (true, Some(Some(json))) => Some(Bytes::from(
                serde_json::to_vec(json).expect("a JSON map always serialises"),
            )),
            _ => self.body.clone(),
        }
    }

    /// The budget the parse layer counted this request's body against
    /// ([`ParseLayer::with_budget`](crate::ParseLayer::with_budget)), if
    /// any. The layers that watch the response's event stream count the
    /// event they are assembling in its pool for answers
    /// ([`Outlines::counted_in`](crate::sse::Outlines::counted_in)), so that one
    /// bound holds for what requests hold and, apart, for what answers
    /// hold.
    pub fn budget(&self) -> Option<&crate::BodyBudget> {
        self.budget.as_ref()
    }

    /// Count the response's buffered events against `budget` too.
    pub(crate) fn set_budget(&mut self, budget: crate::BodyBudget) {
        self.budget = Some(budget);
    }

    /// The caller's identity, once the auth layer has set it.
    pub fn identity(&self) -> Option<&Identity> {
        self.identity.as_ref()
    }

    /// Record the caller's identity (the auth layer does this).
    pub fn set_identity(&mut self, identity: Identity) {
        self.identity = Some(identity);
    }

    /// Mark the request as passed on by the cache layer. A layer that must
    /// sit above the cache (auth: a cache above it would answer requests
    /// whose key was never checked, from entries other keys' requests
    /// stored) refuses a marked request as [`crate::Error::Misconfigured`].
    pub fn mark_passed_cache(&mut self) {
        self.passed_cache = true;
    }

    /// Whether the cache layer passed the request on
    /// ([`RequestMeta::mark_passed_cache`]).
    pub fn passed_cache(&self) -> bool {
        self.passed_cache
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(body: &str) -> RequestMeta {
        let json: Map<String, Value> = serde_json::from_str(body).unwrap();
        RequestMeta::parsed(
            Endpoint::ChatCompletions,
            Bytes::from(body.to_owned()),
            json,
        )
    }

    /// A meta whose body's value is built from `body` when first asked for,
    /// as the parse layer leaves it.
    fn unbuilt(endpoint: Endpoint, body: &'static str) -> RequestMeta {
        let mut m = RequestMeta::parsed(endpoint, Bytes::from_static(body.as_bytes()), Map::new());
        m.json = Some(Arc::new(OnceLock::new()));
        m
    }

    #[test]
    fn unchanged_body_goes_byte_for_byte() {
        let raw = r#"{ "model" : "m",   "stream":true }"#;
        let m = meta(raw);
        assert!(m.is_stream());
        assert_eq!(m.model(), Some("m"));
        assert_eq!(m.body_for_upstream().unwrap(), raw.as_bytes());
    }

    #[test]
    fn an_added_field_leaves_every_other_byte_of_an_unedited_body() {
        let options = serde_json::json!({"include_usage": true});
        for (raw, want) in [
            (
                "{\"model\":\"m\",\"t\":1.0e0,\"o\":{\"a\":{}}} \r\n",
                "{\"model\":\"m\",\"t\":1.0e0,\"o\":{\"a\":{}},\"k\":{\"include_usage\":true}} \r\n",
            ),
            ("{ \n}", "{ \n\"k\":{\"include_usage\":true}}"),
            ("\t{}", "\t{\"k\":{\"include_usage\":true}}"),
        ] {
            let mut m = meta(raw);
            assert!(m.json().is_some(), "built before");
            assert!(m.add_field("k", &options));
            assert!(!m.is_edited());
            assert_eq!(m.body_for_upstream().unwrap(), want.as_bytes(), "{raw:?}");
            assert_eq!(m.json().unwrap()["k"], options, "built anew");
        }
        // An edited body gets it in its parsed object.
        let mut m = meta(r#"{"model":"a"}"#);
        m.json_mut().unwrap().insert("x".into(), Value::Null);
        assert!(m.add_field("k", &options));
        let out: Value = serde_json::from_slice(&m.body_for_upstream().unwrap()).unwrap();
        assert_eq!(
            out,
            serde_json::json!({"model": "a", "x": null, "k": options})
        );
        // No JSON body: nothing to add to.
        assert!(!RequestMeta::unbuffered(Endpoint::ChatCompletions).add_field("k", &options));
    }

    #[test]
    fn a_splice_keeps_the_value_in_step_with_the_bytes() {
        let options = serde_json::json!({"include_usage": true});
        let reparsed = |m: &RequestMeta| {
            serde_json::from_slice::<Map<String, Value>>(&m.body_for_upstream().unwrap()).unwrap()
        };
        let raw = r#"{"model":"a","stream":true,"n":1.50}"#;
        // Built before: the value is edited as the bytes were, not built
        // again; a clone made before keeps the client's.
        let mut m = meta(raw);
        assert!(m.is_built());
        let before = m.clone();
        assert!(m.add_field("stream_options", &options));
        m.set_model("b");
        assert!(m.is_built() && !m.is_edited());
        assert_eq!(m.json().unwrap(), &reparsed(&m));
        assert_eq!(before.json().unwrap(), &reparsed(&before));
        assert_eq!(before.body_for_upstream().unwrap(), raw.as_bytes());
        // Not built: built from the new bytes when asked, and a clone made
        // before builds its own from the client's.
        let mut m = unbuilt(Endpoint::ChatCompletions, raw);
        let before = m.clone();
        assert!(m.add_field("stream_options", &options));
        m.set_model("b");
        assert!(!m.is_built());
        assert_eq!(m.json().unwrap(), &reparsed(&m));
        assert_eq!(m.json().unwrap()["model"], "b");
        assert_eq!(before.json().unwrap()["model"], "a");
        assert!(!before.json().unwrap().contains_key("stream_options"));
    }

    #[test]
    fn the_value_built_from_the_bytes_keeps_every_object_an_object() {
        // serde_json's own reader would read the marker object as `5`.
        let body = r#"{"model":"m","metadata":{"$serde_json::private::RawValue":"5"}}"#;
        let m = unbuilt(Endpoint::Responses, body);
        assert_eq!(
            m.json().unwrap()["metadata"],
            serde_json::json!({"$serde_json::private::RawValue": "5"})
        );
    }

    #[test]
    fn edited_body_is_reserialised() {
        let mut m = meta(r#"{"model":"a","x":1}"#);
        m.set_model("b");
        assert_eq!(m.model(), Some("b"));
        let out: Value = serde_json::from_slice(&m.body_for_upstream().unwrap()).unwrap();
        assert_eq!(out["model"], "b");
        assert_eq!(out["x"], 1);
    }

    #[test]
    fn a_new_model_leaves_every_other_byte_of_an_unedited_body() {
        let raw = r#"{"stream":true, "model" : "llama", "response_format":{"type":"json_schema","json_schema":{"schema":{"properties":{"reasoning":{},"answer":{}},"model":"inner"}}},"t":1.000000000000000001,"n":18446744073709551616}"#;
        let mut m = meta(raw);
        assert_eq!(m.json().unwrap()["model"], "llama", "built before");
        m.set_model("meta-llama/\"8B\"");
        let want = raw.replace(r#""llama""#, r#""meta-llama/\"8B\"""#);
        assert_eq!(m.body_for_upstream().unwrap(), want.as_bytes());
        assert_eq!(m.model(), Some("meta-llama/\"8B\""));
        assert_eq!(
            m.json().unwrap()["model"],
            "meta-llama/\"8B\"",
            "built anew"
        );
        assert!(!m.is_edited());
        // Edited after: the edit holds the new name.
        m.json_mut().unwrap().insert("x".into(), Value::Null);
        let out: Value = serde_json::from_slice(&m.body_for_upstream().unwrap()).unwrap();
        assert_eq!(out["model"], "meta-llama/\"8B\"");
        // An edited body is edited: its keys come out in the map's order.
        m.set_model("c");
        let out: Value = serde_json::from_slice(&m.body_for_upstream().unwrap()).unwrap();
        assert_eq!(
            (&out["model"], &out["x"]),
            (&Value::from("c"), &Value::Null)
        );
        // Not a string model: edited instead, its keys in the client's order.
        let mut m = meta(r#"{"model":null, "b":2,"a":1}"#);
        m.set_model("d");
        assert_eq!(
            m.body_for_upstream().unwrap(),
            r#"{"model":"d","b":2,"a":1}"#.as_bytes()
        );
    }

    #[test]
    fn translated_request_replaces_endpoint_and_body() {
        let mut m = meta(r#"{"model":"a","messages":[]}"#);
        let json: Map<String, Value> =
            serde_json::from_str(r#"{"model":"a","stream":true,"max_tokens":5}"#).unwrap();
        m.translate_to(Endpoint::Messages, json);
        assert_eq!(m.endpoint(), Endpoint::Messages);
        assert!(m.is_stream() && m.is_edited());
        let out: Value = serde_json::from_slice(&m.body_for_upstream().unwrap()).unwrap();
        assert_eq!(
            out,
            serde_json::json!({"model":"a","stream":true,"max_tokens":5})
        );
    }
}

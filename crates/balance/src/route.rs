//! Where a request may go: its model's group, then its fallbacks' groups, and
//! in which order health, earlier attempts and panic routing are weighed.
//!
//! Each choice looks for a backend in passes, the first that finds one wins:
//!
//! 1. healthy and not yet tried, over the model and then each fallback model
//!    in order (so a fallback is used once every upstream of the model has
//!    failed in this request or is resting); within a model, the upstreams
//!    that serve the request's API natively before those that translate;
//! 2. panic routing: not yet tried, ejected or failing its probes, in the
//!    same order (rather than 503 while a resting server may be back); but
//!    not one that asked to be left alone (a 429, a 503 with
//!    `retry-after`) for longer: it said when it will be back;
//! 3. healthy, tried before (one upstream can be retried after a transient
//!    failure; an upstream that just answered 429 or was ejected is not, and
//!    neither is one that left the request without a head until its
//!    first-byte timeout: the client has waited that long once).
//!
//! Within a pass the strategy's [`Picker`](crate::Picker) chooses.

use llm_proxy_core::{Api, Endpoint, Error, ModelAllowlist, PinnedUpstream, RequestMeta};
use smallvec::SmallVec;

use crate::config::{BalanceConfig, Strategy};
use crate::picker::LoadView;
use crate::prefix::PromptPrefix;
use crate::set::{BackendSet, Group, Tier};

/// The backend chosen for one attempt.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Choice<'a> {
    /// Index into the set's members.
    pub(crate) member: usize,
    /// The fallback model the request must be rewritten to, if any.
    pub(crate) model: Option<&'a str>,
}

/// A request's candidate groups, in the order they are tried.
pub(crate) struct Route<'a> {
    /// (group, fallback model name: `None` for the request's own model,
    /// the tier its members serve the request's API at).
    /// Inline for a model and one fallback: most requests allocate none.
    chain: SmallVec<[(&'a Group, Option<&'a str>, Tier); 2]>,
    model: Option<&'a str>,
    endpoint: Endpoint,
    api: Option<Api>,
    key: Option<u64>,
    /// The one member a pinned request may use.
    pinned: Option<usize>,
    /// The request's metadata, asked (once, and only when a group's
    /// translating tier is reached) whether it needs kept state.
    meta: Option<&'a RequestMeta>,
    needs_kept_state: std::sync::OnceLock<bool>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Pass {
    HealthyUntried,
    Untried,
    HealthyTried,
}

impl<'a> Route<'a> {
    /// The route of a request to `path` with `meta` (none: passthrough).
    pub(crate) fn new<S>(
        cfg: &'a BalanceConfig,
        set: &'a BackendSet<S>,
        meta: Option<&'a RequestMeta>,
        pin: Option<&PinnedUpstream>,
        allowed: Option<&ModelAllowlist>,
        path: Option<&str>,
    ) -> Result<Self, Error> {
        let endpoint = meta.map_or(Endpoint::Passthrough, RequestMeta::endpoint);
        let model = meta.and_then(RequestMeta::model);
        let mut api = endpoint.api();
        if let Some(PinnedUpstream(name)) = pin {
            let member = set
                .members
                .iter()
                .position(|m| m.name == *name)
                .ok_or_else(|| {
                    Error::ResponseNotFound(format!(
                        "the upstream `{name}` that holds this response is not configured any more"
                    ))
                })?;
            return Ok(Route {
                chain: SmallVec::new(),
                model,
                endpoint,
                api,
                key: None,
                pinned: Some(member),
                meta,
                needs_kept_state: std::sync::OnceLock::new(),
            });
        }
        // Within a model's group, native first: its upstreams that reach the
        // API only by translation come after the native ones, before the
        // model's fallbacks (a lower preference, never shut out: they stand
        // in while the native ones fail or rest). Each group on its own: a
        // fallback served natively does not shut out the model's own
        // upstreams that translate (it would take every request while they
        // are healthy). A group that serves the API neither way is left out.
        let tiered = |(group, fallback): (&'a Group, Option<&'a str>)| {
            let members = || group.members.iter().map(|&m| &set.members[m]);
            let native = members().any(|m| m.serves(api, Tier::Native));
            let translating =
                members().any(|m| m.serves(api, Tier::Translated) && !m.serves(api, Tier::Native));
            [
                native.then_some((group, fallback, Tier::Native)),
                translating.then_some((group, fallback, Tier::Translated)),
            ]
            .into_iter()
            .flatten()
        };
        let chain: SmallVec<[_; 2]> = match model {
            // A passthrough route that belongs to a model API goes to the
            // upstreams that serve that API natively, when any does; else
            // as any passthrough.
            None if let Some(owner) = path.and_then(passthrough_api).filter(|&owner| {
                endpoint == Endpoint::Passthrough
                    && set
                        .passthrough
                        .members
                        .iter()
                        .any(|&m| set.members[m].serves(Some(owner), Tier::Native))
            }) =>
            {
                api = Some(owner);
                smallvec::smallvec![(&set.passthrough, None, Tier::Native)]
            }
            None => tiered((&set.passthrough, None)).collect(),
            Some(model) => {
                let own = set
                    .group(model)
                    .ok_or_else(|| Error::ModelNotFound(model.to_owned()))?;
                // Fallbacks stand in for a model API's answer; a passthrough
                // body's model (a fine-tune's base model, say) is never
                // rewritten.
                // And never a model the caller's key may not use.
                let fallbacks = cfg
                    .fallbacks
                    .get(model)
                    .filter(|_| endpoint.has_model_body())
                    .into_iter()
                    .flatten()
                    .filter(|fb| allowed.is_none_or(|a| a.allows(fb)));
                std::iter::once((own, None))
                    .chain(fallbacks.filter_map(|fb| Some((set.group(fb)?, Some(fb.as_str())))))
                    .flat_map(tiered)
                    .collect()
            }
        };
        if api.is_some() && chain.is_empty() {
            let api = api.map_or("", Api::as_str);
            return Err(Error::ApiNotServed(match model {
                Some(model) => format!("no upstream serves the `{api}` API for model `{model}`"),
                None => format!("no upstream serves the `{api}` API"),
            }));
        }
        // The body is built for the prefix strategy alone (see
        // `RequestMeta::json`).
        let key = match &cfg.strategy {
            Strategy::PrefixAffinity(p) => meta
                .and_then(RequestMeta::json)
                .and_then(|json| PromptPrefix::from_json(json, p)),
            _ => None,
        };
        Ok(Route {
            chain,
            model,
            endpoint,
            api,
            key,
            pinned: None,
            meta,
            needs_kept_state: std::sync::OnceLock::new(),
        })
    }

    /// Whether the route leaves out `group`'s members at `tier`: a
    /// Responses request that only an upstream that keeps responses can
    /// serve (it asks to be stored, say) is not sent to the group's
    /// upstreams that translate when the group also has native ones. When
    /// those fail, their failure is the answer (a 502 the client retries),
    /// not the translation's 400 telling the client to change its request;
    /// with no native upstream in the group, that 400 is the answer. Asked
    /// only once a translating tier is reached (the native one served
    /// nearly every request before): whether the request needs kept state
    /// may build its body.
    fn leaves_out(&self, group: &Group, tier: Tier) -> bool {
        tier == Tier::Translated
            && self
                .chain
                .iter()
                .any(|&(g, _, t)| t == Tier::Native && std::ptr::eq(g, group))
            && *self
                .needs_kept_state
                .get_or_init(|| self.meta.is_some_and(RequestMeta::needs_kept_state))
    }

    /// When none of the backends this request may go to can take it now
    /// because every one asked to be left alone (429, or 503 with
    /// `retry-after`): the soonest of them is back at this time. `None`
    /// when the route has no backend, or one that did not ask.
    pub(crate) fn resting_until<S>(&self, set: &BackendSet<S>, now: u64) -> Option<u64> {
        let mut soonest: Option<u64> = None;
        for &(group, fallback, tier) in &self.chain {
            if self.leaves_out(group, tier) {
                continue;
            }
            let model = fallback.or(self.model);
            for &member in &group.members {
                let member = &set.members[member];
                if !member.serves(self.api, tier) {
                    continue;
                }
                let until = member.state.throttled_until(now, model)?;
                soonest = Some(soonest.map_or(until, |s| s.min(until)));
            }
        }
        soonest
    }

    /// Whether the route holds a fallback model (pinned: never).
    pub(crate) fn has_fallbacks(&self) -> bool {
        self.chain.iter().any(|(_, model, _)| model.is_some())
    }

    /// The request's own model, if it has one.
    pub(crate) fn model(&self) -> Option<&'a str> {
        self.model
    }

    /// The request's endpoint.
    pub(crate) fn endpoint(&self) -> Endpoint {
        self.endpoint
    }

    /// The backend for the next attempt; `None` when no pass finds one.
    /// `tried`: the members tried so far; `spent`: those of them never to
    /// be tried again in this request (they timed out); `fallbacks_only`:
    /// not the request's own model (its attempt beyond `max_retries`).
    pub(crate) fn choose<S>(
        &self,
        set: &BackendSet<S>,
        tried: &[usize],
        spent: &[usize],
        now: u64,
        random: u64,
        fallbacks_only: bool,
    ) -> Option<Choice<'a>> {
        if let Some(member) = self.pinned {
            // No other upstream can honour a pinned request: retry it only
            // there, and only while it is healthy.
            let again = tried.contains(&member);
            let usable = !again
                || (!spent.contains(&member) && set.members[member].state.takes(now, self.model));
            return usable.then_some(Choice {
                member,
                model: None,
            });
        }
        for pass in [Pass::HealthyUntried, Pass::Untried, Pass::HealthyTried] {
            for &(group, model, tier) in &self.chain {
                if (fallbacks_only && model.is_none()) || self.leaves_out(group, tier) {
                    continue;
                }
                let view = View {
                    set,
                    group,
                    tried,
                    spent,
                    now,
                    pass,
                    api: self.api,
                    tier,
                    model: model.or(self.model),
                };
                if let Some(i) = group.picker.pick(&view, self.key, random) {
                    return Some(Choice {
                        member: group.members[i],
                        model,
                    });
                }
            }
        }
        None
    }
}

/// The model API a passthrough `path` belongs to: OpenAI's Conversations
/// API is its Responses API's (a conversation made where Responses are not
/// served natively is one no response can use), Anthropic's Message
/// Batches API (`/v1/messages/batches…`) its Messages API's (an OpenAI
/// server has no such route).
fn passthrough_api(path: &str) -> Option<Api> {
    if llm_proxy_core::conversation_path(path).is_some() {
        Some(Api::Responses)
    } else if path.starts_with("/v1/messages/") {
        Some(Api::Messages)
    } else {
        None
    }
}

/// A group's backends as one pass sees them.
struct View<'v, S> {
    set: &'v BackendSet<S>,
    group: &'v Group,
    tried: &'v [usize],
    spent: &'v [usize],
    now: u64,
    pass: Pass,
    api: Option<Api>,
    tier: Tier,
    /// The model the request goes as to this group.
    model: Option<&'v str>,
}

impl<S> LoadView for View<'_, S> {
    fn len(&self) -> usize {
        self.group.members.len()
    }

    fn is_available(&self, i: usize) -> bool {
        let member = self.group.members[i];
        if !self.set.members[member].serves(self.api, self.tier) {
            return false;
        }
        let tried = self.tried.contains(&member);
        let healthy = || self.set.members[member].state.takes(self.now, self.model);
        match self.pass {
            Pass::HealthyUntried => !tried && healthy(),
            Pass::Untried => {
                !tried
                    && self.set.members[member]
                        .state
                        .throttled_until(self.now, self.model)
                        .is_none()
            }
            Pass::HealthyTried => tried && !self.spent.contains(&member) && healthy(),
        }
    }

    fn in_flight(&self, i: usize) -> u32 {
        self.set.members[self.group.members[i]].state.in_flight()
    }

    fn cost(&self, i: usize) -> f64 {
        self.set.members[self.group.members[i]].state.cost(self.now)
    }

    fn is_retry(&self) -> bool {
        !self.tried.is_empty()
    }
}

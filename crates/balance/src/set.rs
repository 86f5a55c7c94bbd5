//! The backends and, per model, the group of candidates with its picker.
//!
//! A [`BackendSet`] is immutable: a run-time change builds a new one and
//! swaps it in. Requests hold the set they started with (an `Arc`), so a
//! change never disturbs them; the per-backend [`BackendState`] is shared
//! between sets, so counts and health carry over.

use llm_proxy_core::Api;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use crate::config::Strategy;
use crate::picker::{Picker, PickerMember};
use crate::state::BackendState;

/// One upstream the balancer may send requests to.
///
/// ```
/// use llm_proxy_balance::Backend;
/// # let service = tower::service_fn(|_req: http::Request<llm_proxy_core::Body>| async {
/// #     Ok::<_, llm_proxy_core::Error>(http::Response::new(llm_proxy_core::empty()))
/// # });
/// let gpu_a = Backend::new("gpu-a", service)
///     .with_models(["llama-3.1-8b"])
///     .with_weight(3);
/// assert_eq!(gpu_a.weight, 3);
/// ```
#[derive(Clone, Debug)]
pub struct Backend<S> {
    /// A unique name (logs, metrics, the prefix ring, run-time removal).
    pub name: Arc<str>,
    /// The service that sends a request to this upstream.
    pub service: S,
    /// The models it serves; `None` serves every model.
    pub models: Option<Vec<String>>,
    /// Its share under [`Strategy::Weighted`] (default 1; 0 drains it).
    pub weight: u32,
    /// The APIs it serves natively; `None` serves every API.
    pub apis: Option<Vec<Api>>,
    /// APIs it serves only by translation: a candidate for them only when no
    /// candidate serves the API natively (native always wins).
    pub translated_apis: Vec<Api>,
    /// The name it serves a model under, where that differs from the
    /// model's name to clients (vLLM's `--served-model-name`, an Ollama
    /// tag, a provider's dated name): a request for the model is sent here
    /// with its body's `model` rewritten (empty: none rewritten).
    pub served_names: HashMap<String, String>,
}

impl<S> Backend<S> {
    /// A backend serving every model with weight 1.
    pub fn new(name: impl Into<Arc<str>>, service: S) -> Self {
        Backend {
            name: name.into(),
            service,
            models: None,
            weight: 1,
            apis: None,
            translated_apis: Vec::new(),
            served_names: HashMap::new(),
        }
    }

    /// Serve only these models.
    pub fn with_models<I, M>(mut self, models: I) -> Self
    where
        I: IntoIterator<Item = M>,
        M: Into<String>,
    {
        self.models = Some(models.into_iter().map(Into::into).collect());
        self
    }

    /// Serve only these APIs (a request of another API never comes here).
    pub fn with_apis(mut self, apis: impl IntoIterator<Item = Api>) -> Self {
        self.apis = Some(apis.into_iter().collect());
        self
    }

    /// Also serve these APIs by translation (used only when no candidate
    /// serves the request's API natively).
    pub fn with_translated_apis(mut self, apis: impl IntoIterator<Item = Api>) -> Self {
        self.translated_apis = apis.into_iter().collect();
        self
    }

    /// Serve these models under other names: each `(model, served)` pair
    /// sends a request for `model` here with its body's `model` set to
    /// `served` (a request the parse layer read as JSON; see
    /// [`RequestMeta::set_model`](llm_proxy_core::RequestMeta::set_model)).
    /// The model keeps its own name everywhere else: routing, key
    /// allowlists, the cache key, usage.
    pub fn with_served_names<I, M, N>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = (M, N)>,
        M: Into<String>,
        N: Into<String>,
    {
        self.served_names = names
            .into_iter()
            .map(|(model, served)| (model.into(), served.into()))
            .collect();
        self
    }

    /// Set the weight for [`Strategy::Weighted`].
    pub fn with_weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }
}

/// Which backends may take an API: those serving it natively, or, when none
/// of the candidates does, also those serving it by translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Tier {
    Native,
    Translated,
}

/// A backend in a set: its config, its service and its shared state.
pub(crate) struct Member<S> {
    pub(crate) name: Arc<str>,
    pub(crate) models: Option<Vec<String>>,
    pub(crate) weight: u32,
    pub(crate) apis: Option<Vec<Api>>,
    pub(crate) translated_apis: Vec<Api>,
    served_names: HashMap<String, String>,
    /// Behind a lock so that `S` need not be `Sync`; held only to clone.
    service: Mutex<S>,
    pub(crate) state: Arc<BackendState>,
}

impl<S> Member<S> {
    /// The name it serves `model` under, when that is another name.
    pub(crate) fn served_name(&self, model: &str) -> Option<&str> {
        if self.served_names.is_empty() {
            return None;
        }
        self.served_names.get(model).map(String::as_str)
    }

    /// Whether it serves `api` at `tier` (`None`: a route outside the model
    /// APIs, which every backend takes).
    pub(crate) fn serves(&self, api: Option<Api>, tier: Tier) -> bool {
        let Some(api) = api else { return true };
        match tier {
            Tier::Native => self.apis.as_ref().is_none_or(|apis| apis.contains(&api)),
            Tier::Translated => {
                self.serves(Some(api), Tier::Native) || self.translated_apis.contains(&api)
            }
        }
    }
}

impl<S: Clone> Member<S> {
    pub(crate) fn new(backend: Backend<S>, state: Arc<BackendState>) -> Self {
        Member {
            name: backend.name,
            models: backend.models,
            weight: backend.weight,
            apis: backend.apis,
            translated_apis: backend.translated_apis,
            served_names: backend.served_names,
            service: Mutex::new(backend.service),
            state,
        }
    }

    /// A clone of the service for one attempt.
    pub(crate) fn service(&self) -> S {
        self.service
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// The candidates of one model (or of passthrough routes), with the picker
/// that chooses among them and keeps its rotation state.
#[derive(Debug)]
pub(crate) struct Group {
    /// Indices into [`BackendSet::members`], in config order.
    pub(crate) members: Vec<usize>,
    /// Shared with the same group of the set this one replaced when its
    /// members (names and weights, in order) are the same, and otherwise
    /// built with that group's rotation state carried over: a change to
    /// the set, or a backend put back unchanged (as discovery does on every
    /// refresh), keeps the rotation turning instead of starting it over at
    /// the first backend.
    pub(crate) picker: Arc<Picker>,
}

impl Group {
    fn new<S>(
        strategy: &Strategy,
        all: &[Arc<Member<S>>],
        members: Vec<usize>,
        previous: Option<(&Group, &[Arc<Member<S>>])>,
    ) -> Group {
        let view: Vec<PickerMember<'_>> = members
            .iter()
            .map(|&i| PickerMember {
                name: &all[i].name,
                weight: all[i].weight,
            })
            .collect();
        let picker =
            match previous {
                Some((group, old))
                    if group.members.len() == view.len()
                        && group.members.iter().zip(&view).all(|(&i, m)| {
                            *old[i].name == *m.name && old[i].weight == m.weight
                        }) =>
                {
                    group.picker.clone()
                }
                Some((group, old)) => {
                    let picker = Picker::new(strategy, &view);
                    let then: Vec<&str> = group.members.iter().map(|&i| &*old[i].name).collect();
                    let now: Vec<&str> = view.iter().map(|m| m.name).collect();
                    picker.carry_over(&group.picker, &then, &now);
                    Arc::new(picker)
                }
                None => Arc::new(Picker::new(strategy, &view)),
            };
        Group { picker, members }
    }
}

/// Every backend, in config order, and the candidate groups.
pub(crate) struct BackendSet<S> {
    pub(crate) members: Vec<Arc<Member<S>>>,
    by_model: HashMap<String, Group>,
    /// Backends serving every model: the group of any model not listed.
    any_model: Option<Group>,
    /// Every backend in config order, first available first (passthrough).
    pub(crate) passthrough: Group,
}

impl<S> BackendSet<S> {
    /// The set of `members`, its pickers carried over from `previous` (the
    /// set it replaces) where a group is unchanged.
    pub(crate) fn new(
        strategy: &Strategy,
        members: Vec<Arc<Member<S>>>,
        previous: Option<&BackendSet<S>>,
    ) -> Self {
        let wildcard: Vec<usize> = (0..members.len())
            .filter(|&i| members[i].models.is_none())
            .collect();
        let mut listed: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, m) in members.iter().enumerate() {
            for model in m.models.iter().flatten() {
                let entry = listed.entry(model.as_str()).or_default();
                if !entry.contains(&i) {
                    entry.push(i);
                }
            }
        }
        let old_members = previous.map(|p| p.members.as_slice());
        let by_model = listed
            .into_iter()
            .map(|(model, mut group)| {
                group.extend(wildcard.iter().copied());
                group.sort_unstable();
                let previous = previous
                    .and_then(|p| p.by_model.get(model))
                    .zip(old_members);
                (
                    model.to_owned(),
                    Group::new(strategy, &members, group, previous),
                )
            })
            .collect();
        let any_model = (!wildcard.is_empty()).then(|| {
            let previous = previous.and_then(|p| p.any_model.as_ref()).zip(old_members);
            Group::new(strategy, &members, wildcard, previous)
        });
        let passthrough = Group {
            members: (0..members.len()).collect(),
            picker: Arc::new(Picker::first_available(members.len())),
        };
        BackendSet {
            members,
            by_model,
            any_model,
            passthrough,
        }
    }

    /// The candidates for `model`: those listing it plus those serving every
    /// model. `None` when no backend serves it.
    pub(crate) fn group(&self, model: &str) -> Option<&Group> {
        self.by_model.get(model).or(self.any_model.as_ref())
    }
}

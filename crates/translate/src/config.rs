//! What an upstream speaks, and which translation (if any) a request needs.

use llm_proxy_core::{Api, Endpoint, Error};

/// The conventions an upstream follows (`protocol` in an upstream's config).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// An OpenAI-compatible server: vLLM, llama.cpp, Ollama, OpenAI.
    #[default]
    OpenAi,
    /// Anthropic's API (or a server that copies it): Messages only.
    Anthropic,
}

impl Protocol {
    /// The APIs such an upstream serves when its config does not list them:
    /// chat completions, completions and embeddings for [`Protocol::OpenAi`],
    /// Messages for [`Protocol::Anthropic`] (DESIGN.md's `apis` default).
    pub fn default_apis(self) -> &'static [Api] {
        match self {
            Protocol::OpenAi => &[Api::ChatCompletions, Api::Completions, Api::Embeddings],
            Protocol::Anthropic => &[Api::Messages],
        }
    }
}

/// One upstream's dialects: what the translation layer in front of it needs
/// to know.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TranslateConfig {
    /// The APIs the upstream serves natively. Empty means the protocol's
    /// [`Protocol::default_apis`].
    pub native: Vec<Api>,
    /// The upstream's conventions.
    pub protocol: Protocol,
}

/// A translation the layer performs: the client's dialect over the
/// upstream's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// An Anthropic Messages client served by a chat-completions upstream.
    MessagesOverChat,
    /// A chat-completions client served by a Messages upstream.
    ChatOverMessages,
    /// A Responses client served (statelessly) by a chat-completions upstream.
    ResponsesOverChat,
}

impl Direction {
    /// The endpoint the upstream is asked.
    pub fn upstream_endpoint(self) -> Endpoint {
        match self {
            Direction::MessagesOverChat | Direction::ResponsesOverChat => Endpoint::ChatCompletions,
            Direction::ChatOverMessages => Endpoint::Messages,
        }
    }

    /// The path the upstream is asked (the upstream client joins everything
    /// after `/v1` onto its base URL).
    pub(crate) fn upstream_path(self) -> &'static str {
        match self.upstream_endpoint() {
            Endpoint::Messages => "/v1/messages",
            _ => "/v1/chat/completions",
        }
    }
}

/// What to do with one request.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Plan {
    /// The upstream speaks the client's dialect (or the route is not a model
    /// API): pass the request through untouched.
    Native,
    /// Translate in this direction.
    Translate(Direction),
    /// The upstream can serve this request in no way.
    Refuse(String),
}

impl TranslateConfig {
    /// A config for an upstream of `protocol` serving `native` APIs.
    pub fn new(protocol: Protocol, native: impl IntoIterator<Item = Api>) -> Self {
        TranslateConfig {
            native: native.into_iter().collect(),
            protocol,
        }
    }

    /// The APIs served natively, defaults applied.
    pub fn native_apis(&self) -> &[Api] {
        if self.native.is_empty() {
            self.protocol.default_apis()
        } else {
            &self.native
        }
    }

    /// Whether `api` is served natively.
    pub fn is_native(&self, api: Api) -> bool {
        self.native_apis().contains(&api)
    }

    /// Whether the upstream can serve requests of `api`, natively or through
    /// a translation: what a balancer filters candidates by. Some endpoints
    /// of a translatable API still cannot be translated (see
    /// [`TranslateConfig::can_serve_endpoint`]).
    pub fn can_serve(&self, api: Api) -> bool {
        self.is_native(api) || self.direction_for(api).is_some()
    }

    /// Whether the upstream can serve a request to `endpoint`. Narrower than
    /// [`TranslateConfig::can_serve`]: a translation covers `POST
    /// /v1/messages` and `POST /v1/responses`, not `count_tokens`, `compact`,
    /// `input_tokens` or the stateful `/v1/responses/{id}` routes. Routes that
    /// belong to no model API (`/v1/models`, passthrough) are always served.
    pub fn can_serve_endpoint(&self, endpoint: Endpoint) -> bool {
        !matches!(self.plan(endpoint), Plan::Refuse(_))
    }

    /// The translation that serves `api` on this upstream, if any (whether or
    /// not it is also native).
    fn direction_for(&self, api: Api) -> Option<Direction> {
        match api {
            Api::Messages if self.is_native(Api::ChatCompletions) => {
                Some(Direction::MessagesOverChat)
            }
            Api::ChatCompletions if self.is_native(Api::Messages) => {
                Some(Direction::ChatOverMessages)
            }
            Api::Responses if self.is_native(Api::ChatCompletions) => {
                Some(Direction::ResponsesOverChat)
            }
            _ => None,
        }
    }

    /// What to do with a request to `endpoint`. Native always wins.
    pub(crate) fn plan(&self, endpoint: Endpoint) -> Plan {
        let Some(api) = endpoint.api() else {
            return Plan::Native;
        };
        if self.is_native(api) {
            return Plan::Native;
        }
        let translatable = matches!(
            endpoint,
            Endpoint::Messages | Endpoint::ChatCompletions | Endpoint::Responses
        );
        match self.direction_for(api) {
            Some(direction) if translatable => Plan::Translate(direction),
            Some(_) => Plan::Refuse(format!(
                "this upstream does not serve the {} API natively, and `{}` cannot be translated \
                 from the {} API it serves",
                api.as_str(),
                endpoint.as_str(),
                self.describe_native(),
            )),
            None => Plan::Refuse(format!(
                "this upstream serves {}, not the {} API, and no translation connects them",
                self.describe_native(),
                api.as_str(),
            )),
        }
    }

    fn describe_native(&self) -> String {
        let names: Vec<&str> = self.native_apis().iter().map(|a| a.as_str()).collect();
        names.join(", ")
    }

    /// [`Plan::Refuse`] as the error the client gets.
    pub(crate) fn refusal(message: String) -> Error {
        Error::ApiNotServed(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat_only() -> TranslateConfig {
        TranslateConfig::new(Protocol::OpenAi, [Api::ChatCompletions])
    }

    #[test]
    fn native_wins() {
        let cfg = TranslateConfig::new(Protocol::OpenAi, [Api::ChatCompletions, Api::Messages]);
        assert_eq!(cfg.plan(Endpoint::Messages), Plan::Native);
        assert_eq!(cfg.plan(Endpoint::ChatCompletions), Plan::Native);
        assert_eq!(
            cfg.plan(Endpoint::Responses),
            Plan::Translate(Direction::ResponsesOverChat)
        );
    }

    #[test]
    fn chat_only_upstream() {
        let cfg = chat_only();
        assert_eq!(
            cfg.plan(Endpoint::Messages),
            Plan::Translate(Direction::MessagesOverChat)
        );
        assert!(cfg.can_serve(Api::Messages) && cfg.can_serve(Api::Responses));
        assert!(!cfg.can_serve(Api::Embeddings));
        assert!(matches!(cfg.plan(Endpoint::Embeddings), Plan::Refuse(_)));
        assert!(!cfg.can_serve_endpoint(Endpoint::MessagesCountTokens));
        assert!(!cfg.can_serve_endpoint(Endpoint::ResponseById));
        assert!(cfg.can_serve_endpoint(Endpoint::Models));
        assert!(cfg.can_serve_endpoint(Endpoint::Passthrough));
    }

    #[test]
    fn anthropic_upstream_defaults_to_messages() {
        let cfg = TranslateConfig::new(Protocol::Anthropic, []);
        assert_eq!(cfg.native_apis(), &[Api::Messages]);
        assert_eq!(
            cfg.plan(Endpoint::ChatCompletions),
            Plan::Translate(Direction::ChatOverMessages)
        );
        assert!(!cfg.can_serve(Api::Responses));
        assert!(!cfg.can_serve(Api::Completions));
        let Plan::Refuse(why) = cfg.plan(Endpoint::Responses) else {
            panic!("responses cannot be served");
        };
        assert!(
            why.contains("messages") && why.contains("responses"),
            "{why}"
        );
    }
}

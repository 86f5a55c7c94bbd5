/// Which API a request speaks, decided from its method and path.
///
/// Model endpoints (`ChatCompletions`, `Completions`, `Embeddings`) carry a JSON
/// body with a `model`; the parse layer reads it. `Passthrough` is any other
/// `/v1/*` path, forwarded as is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Endpoint {
    /// `POST /v1/chat/completions`
    ChatCompletions,
    /// `POST /v1/completions`
    Completions,
    /// `POST /v1/embeddings`
    Embeddings,
    /// `GET /v1/models`
    Models,
    /// Any other `/v1/*` path.
    Passthrough,
}

impl Endpoint {
    /// Classify a request path (without query). `None` for paths outside `/v1/`.
    pub fn from_path(path: &str) -> Option<Endpoint> {
        let rest = path.strip_prefix("/v1/")?;
        Some(match rest.trim_end_matches('/') {
            "chat/completions" => Endpoint::ChatCompletions,
            "completions" => Endpoint::Completions,
            "embeddings" => Endpoint::Embeddings,
            "models" => Endpoint::Models,
            _ => Endpoint::Passthrough,
        })
    }

    /// Whether requests to this endpoint carry a JSON body with a `model` that
    /// the parse layer must read.
    pub fn has_model_body(self) -> bool {
        matches!(
            self,
            Endpoint::ChatCompletions | Endpoint::Completions | Endpoint::Embeddings
        )
    }

    /// The HTTP method this endpoint answers, if it is fixed.
    pub fn method(self) -> Option<http::Method> {
        match self {
            Endpoint::ChatCompletions | Endpoint::Completions | Endpoint::Embeddings => {
                Some(http::Method::POST)
            }
            Endpoint::Models => Some(http::Method::GET),
            Endpoint::Passthrough => None,
        }
    }

    /// Whether a streamed answer of this endpoint is an OpenAI-style SSE
    /// stream ending in `data: [DONE]`.
    pub fn streams_done_sentinel(self) -> bool {
        matches!(self, Endpoint::ChatCompletions | Endpoint::Completions)
    }

    /// A short, stable name for metrics labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat_completions",
            Endpoint::Completions => "completions",
            Endpoint::Embeddings => "embeddings",
            Endpoint::Models => "models",
            Endpoint::Passthrough => "passthrough",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }
}

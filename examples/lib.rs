//! Runnable examples of llm-proxy; see the files beside this one:
//! `llm-proxy.rs` (the proxy binary), `minimal.rs`, `axum_embed.rs`,
//! `mock_server.rs`. This library is empty: the package exists for its
//! examples.
#![forbid(unsafe_code)]

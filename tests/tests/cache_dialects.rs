//! The response cache on `/v1/responses` and `/v1/messages`, through the
//! proxy over real sockets, with the mock upstream serving both dialects and
//! counting its calls: stateless requests hit after a miss (streamed and
//! not, the same bytes), stateful Responses bypass, and answers that did not
//! end cleanly are not stored.

use http::Method;
use serde_json::json;
use tests::*;

const RESPONSES: &str = "/v1/responses";
const MESSAGES: &str = "/v1/messages";

/// One upstream serving the three dialects, and a memory cache.
fn config(upstream: &str) -> String {
    format!(
        "{}\n[cache]\nbackend = \"memory\"\nttl_secs = 60\n",
        one_upstream(
            upstream,
            "apis = [\"chat_completions\", \"responses\", \"messages\"]"
        )
    )
}

fn responses_body(stream: bool, extra: serde_json::Value) -> String {
    let mut body = json!({
        "model": "m",
        "stream": stream,
        "store": false,
        "input": "Say something deterministic.",
    });
    if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
        body.extend(extra.clone());
    }
    body.to_string()
}

fn messages_body(stream: bool) -> String {
    json!({
        "model": "m",
        "max_tokens": 64,
        "stream": stream,
        "messages": [{"role": "user", "content": "Say something deterministic."}],
    })
    .to_string()
}

const ANTHROPIC: &[(&str, &str)] = &[
    ("content-type", "application/json"),
    ("anthropic-version", "2023-06-01"),
];

async fn post_messages(url: &str, body: &str) -> Answer {
    send(request(Method::POST, url, ANTHROPIC, body.to_owned())).await
}

fn cache(answer: &Answer) -> Option<&str> {
    answer.header("x-llm-proxy-cache")
}

#[tokio::test]
async fn stateless_responses_hit_after_a_miss_streamed_and_not() {
    let up = mock_named("m").await;
    let p = proxy(&config(&up.base_url())).await;
    let url = p.url(RESPONSES);
    for (n, stream) in [false, true].into_iter().enumerate() {
        let body = responses_body(stream, json!({}));
        let first = post_json(&url, &body).await;
        assert_eq!(
            (first.status.as_u16(), cache(&first)),
            (200, Some("miss")),
            "{}",
            first.text()
        );
        let second = post_json(&url, &body).await;
        assert_eq!(cache(&second), Some("hit"));
        assert_eq!(
            second.body, first.body,
            "the same bytes, id and usage included"
        );
        if stream {
            assert_eq!(second.header("content-type"), Some("text/event-stream"));
            let text = second.text();
            assert!(text.contains("event: response.created\n"), "{text}");
            assert!(text.contains("event: response.completed\n"), "{text}");
            assert!(!text.contains("[DONE]"));
        } else {
            assert_eq!(second.json()["status"], "completed");
            assert!(second.json()["usage"]["output_tokens"].as_u64() > Some(0));
        }
        assert_eq!(up.stats.requests_for(RESPONSES), n as u64 + 1);
    }
}

#[tokio::test]
async fn stateful_responses_bypass_the_cache() {
    let up = mock_named("m").await;
    let p = proxy(&config(&up.base_url())).await;
    let url = p.url(RESPONSES);
    // `store` left to its default (true), or set: the response is kept
    // upstream, so every request goes there.
    let stored = [
        json!({"model": "m", "input": "Say something deterministic."}).to_string(),
        responses_body(false, json!({"store": true})),
        responses_body(true, json!({"store": true})),
    ];
    let mut id = String::new();
    for body in &stored {
        for _ in 0..2 {
            let answer = post_json(&url, body).await;
            assert_eq!(
                (answer.status.as_u16(), cache(&answer)),
                (200, Some("bypass"))
            );
            if id.is_empty() {
                id = answer.json()["id"].as_str().expect("an id").to_owned();
            }
        }
    }
    assert_eq!(up.stats.requests_for(RESPONSES), 6);
    // A follow-up of a stored response, even with `store: false`.
    let follow_up = responses_body(false, json!({"previous_response_id": id}));
    for _ in 0..2 {
        let answer = post_json(&url, &follow_up).await;
        assert_eq!(
            (answer.status.as_u16(), cache(&answer)),
            (200, Some("bypass")),
            "{}",
            answer.text()
        );
    }
    assert_eq!(up.stats.requests_for(RESPONSES), 8);
}

#[tokio::test]
async fn messages_hit_after_a_miss_streamed_and_not() {
    let up = mock_named("m").await;
    let p = proxy(&config(&up.base_url())).await;
    let url = p.url(MESSAGES);
    for (n, stream) in [false, true].into_iter().enumerate() {
        let body = messages_body(stream);
        let first = post_messages(&url, &body).await;
        assert_eq!(
            (first.status.as_u16(), cache(&first)),
            (200, Some("miss")),
            "{}",
            first.text()
        );
        let second = post_messages(&url, &body).await;
        assert_eq!(cache(&second), Some("hit"));
        assert_eq!(
            second.body, first.body,
            "the same bytes, id and usage included"
        );
        if stream {
            let text = second.text();
            assert!(text.starts_with("event: message_start\n"), "{text}");
            assert!(text.contains("event: message_stop\n"), "{text}");
        } else {
            assert_eq!(second.json()["type"], "message");
        }
        assert_eq!(up.stats.requests_for(MESSAGES), n as u64 + 1);
    }
}

#[tokio::test]
async fn chat_responses_and_messages_never_share_entries() {
    let up = mock_named("m").await;
    let p = proxy(&config(&up.base_url())).await;
    // One body every dialect accepts.
    let body = json!({
        "model": "m", "store": false, "max_tokens": 64,
        "input": "Say something deterministic.",
        "messages": [{"role": "user", "content": "Say something deterministic."}],
    })
    .to_string();
    let paths = ["/v1/chat/completions", RESPONSES, MESSAGES];
    for round in ["miss", "hit"] {
        for path in paths {
            let answer = post_messages(&p.url(path), &body).await;
            assert_eq!(
                (answer.status.as_u16(), cache(&answer)),
                (200, Some(round)),
                "{path}: {}",
                answer.text()
            );
        }
    }
    for path in paths {
        assert_eq!(up.stats.requests_for(path), 1, "{path}");
    }
}

#[tokio::test]
async fn incomplete_and_broken_answers_are_not_stored() {
    let up = mock_named("m").await;
    let p = proxy(&config(&up.base_url())).await;
    // Capped by max_output_tokens: `incomplete`, streamed or not.
    for stream in [false, true] {
        let capped = responses_body(stream, json!({"max_output_tokens": 2}));
        for _ in 0..2 {
            let answer = post_json(&p.url(RESPONSES), &capped).await;
            assert_eq!(cache(&answer), Some("miss"));
            assert!(answer.text().contains("incomplete"), "{}", answer.text());
        }
    }
    assert_eq!(up.stats.requests_for(RESPONSES), 4);
    // Streams cut mid-way, in both dialects.
    for (path, body, headers) in [
        (RESPONSES, responses_body(true, json!({})), &ANTHROPIC[..1]),
        (MESSAGES, messages_body(true), ANTHROPIC),
    ] {
        let mut cut_headers = headers.to_vec();
        cut_headers.push(("x-mock-fail", "drop"));
        let resp = client()
            .request(request(
                Method::POST,
                &p.url(path),
                &cut_headers,
                body.clone(),
            ))
            .await
            .expect("response head");
        assert_eq!(
            resp.headers()
                .get("x-llm-proxy-cache")
                .and_then(|v| v.to_str().ok()),
            Some("miss")
        );
        let (_, cut) = read_stream(resp).await;
        assert!(cut, "{path}: the broken stream closes the connection");
        let again = send(request(Method::POST, &p.url(path), headers, body)).await;
        assert_eq!(cache(&again), Some("miss"), "{path}: nothing was stored");
        assert_eq!(
            up.stats.requests_for(path),
            if path == RESPONSES { 6 } else { 2 }
        );
    }
}

#[tokio::test]
async fn answers_that_depend_on_more_than_the_body_bypass_the_cache() {
    let up = mock_named("m").await;
    let p = proxy(&config(&up.base_url())).await;
    let with = |base: String, extra: serde_json::Value| {
        let mut body: serde_json::Value = serde_json::from_str(&base).unwrap();
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body.to_string()
    };
    let messages = |extra| with(messages_body(false), extra);
    let cases = [
        // A code-execution container keeps files between requests.
        (MESSAGES, messages(json!({"container": "container_1"}))),
        (
            MESSAGES,
            messages(json!({"mcp_servers": [{"type": "url", "url": "https://x", "name": "x"}]})),
        ),
        (
            MESSAGES,
            messages(json!({"tools": [{"type": "web_search_20250305", "name": "web_search"}]})),
        ),
        (
            RESPONSES,
            responses_body(
                false,
                json!({"tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]}),
            ),
        ),
        (
            RESPONSES,
            responses_body(false, json!({"tools": [{"type": "web_search_preview"}]})),
        ),
        (
            "/v1/chat/completions",
            with(chat("m", false), json!({"web_search_options": {}})),
        ),
        // A stored completion is kept upstream, to be fetched by its id.
        (
            "/v1/chat/completions",
            with(chat("m", false), json!({"store": true})),
        ),
        (
            "/v1/chat/completions",
            with(chat("m", false), json!({"store": "true"})),
        ),
    ];
    for (path, body) in cases {
        for _ in 0..2 {
            let answer = if path == MESSAGES {
                post_messages(&p.url(path), &body).await
            } else {
                post_json(&p.url(path), &body).await
            };
            assert_eq!(cache(&answer), Some("bypass"), "{body}");
        }
    }
    // `store: false` is chat's default, `null` reads as absent: cached.
    for absent in [
        json!({"store": false}),
        json!({"store": null}),
        json!({"web_search_options": null}),
    ] {
        let unstored = with(chat("m", false), absent);
        for expected in ["miss", "hit"] {
            let answer = post_json(&p.url("/v1/chat/completions"), &unstored).await;
            assert_eq!(cache(&answer), Some(expected), "{unstored}");
        }
    }
    // A function tool (run by the client) is part of the body: cached.
    let tools = responses_body(
        false,
        json!({"tools": [{"type": "function", "name": "f", "parameters": {}}]}),
    );
    assert_eq!(
        cache(&post_json(&p.url(RESPONSES), &tools).await),
        Some("miss")
    );
    assert_eq!(
        cache(&post_json(&p.url(RESPONSES), &tools).await),
        Some("hit")
    );
}

#[tokio::test]
async fn stream_false_and_no_stream_share_an_entry() {
    let up = mock_named("m").await;
    let p = proxy(&config(&up.base_url())).await;
    let without_stream = |body: String| {
        let mut body: serde_json::Value = serde_json::from_str(&body).unwrap();
        body.as_object_mut().unwrap().remove("stream");
        body.to_string()
    };
    let cases = [
        ("/v1/chat/completions", chat("m", false)),
        (RESPONSES, responses_body(false, json!({}))),
        (MESSAGES, messages_body(false)),
    ];
    for (path, body) in cases {
        let first = post_messages(&p.url(path), &body).await;
        assert_eq!((first.status.as_u16(), cache(&first)), (200, Some("miss")));
        let second = post_messages(&p.url(path), &without_stream(body)).await;
        assert_eq!(
            (second.status.as_u16(), cache(&second)),
            (200, Some("hit")),
            "{path}: `\"stream\": false` asks for what no `stream` does"
        );
        assert_eq!(second.body, first.body, "{path}");
        assert_eq!(up.stats.requests_for(path), 1, "{path}");
    }
}

#[tokio::test]
async fn only_if_cached_misses_are_504_in_each_dialect() {
    let up = mock_named("m").await;
    let p = proxy(&config(&up.base_url())).await;
    let only = [
        ANTHROPIC[0],
        ANTHROPIC[1],
        ("cache-control", "only-if-cached"),
    ];
    let messages = send(request(
        Method::POST,
        &p.url(MESSAGES),
        &only,
        messages_body(false),
    ))
    .await;
    assert_eq!(
        (messages.status.as_u16(), cache(&messages)),
        (504, Some("miss"))
    );
    let json = messages.json();
    assert_eq!(
        (&json["type"], &json["error"]["type"]),
        (&"error".into(), &"timeout_error".into()),
        "Anthropic-shaped: {json}"
    );
    let body = responses_body(false, json!({}));
    let responses = send(request(Method::POST, &p.url(RESPONSES), &only, body)).await;
    assert_eq!(
        (responses.status.as_u16(), cache(&responses)),
        (504, Some("miss"))
    );
    assert_eq!(responses.json()["error"]["code"], "not_cached");
    // A stateful Responses request is never served from the cache.
    let stored = json!({"model": "m", "input": "x"}).to_string();
    let stateful = send(request(Method::POST, &p.url(RESPONSES), &only, stored)).await;
    assert_eq!(
        (stateful.status.as_u16(), cache(&stateful)),
        (504, Some("bypass"))
    );
    assert_eq!(
        up.stats.requests_for(MESSAGES) + up.stats.requests_for(RESPONSES),
        0
    );
}

/// An object whose one key is serde_json's raw-value marker is an object
/// like any other: keyed as the upstream gets it, not as the JSON text in
/// its string (serde_json's own `Value` reader reads it so, which would
/// make two different requests one entry, and a shared cache's client
/// could store an answer under another's request).
#[tokio::test]
async fn a_raw_value_marker_object_is_keyed_as_sent() {
    let up = mock_named("m").await;
    let p = proxy(&config(&up.base_url())).await;
    let marker = "$serde_json::private::RawValue";
    let chat = |options: serde_json::Value| {
        json!({"model": "m", "stream_options": options, "messages": [{"role": "user", "content": "hi"}]})
            .to_string()
    };
    let cases = [
        // Keyed from the built body.
        (
            p.url(RESPONSES),
            responses_body(false, json!({"metadata": {"k": "v"}})),
            responses_body(false, json!({"metadata": {marker: "{\"k\":\"v\"}"}})),
        ),
        // Keyed in one pass over the bytes; `stream_options` read back.
        (
            p.url("/v1/chat/completions"),
            chat(json!({"continuous_usage_stats": true})),
            chat(json!({marker: "{\"continuous_usage_stats\":true}"})),
        ),
    ];
    for (url, plain, marked) in cases {
        let calls = up.stats.requests();
        let first = post_json(&url, &plain).await;
        assert_eq!(cache(&first), Some("miss"), "{}", first.text());
        let second = post_json(&url, &marked).await;
        assert_eq!(cache(&second), Some("miss"), "{marked}: {}", second.text());
        assert_eq!(up.stats.requests(), calls + 2, "{marked}");
    }
    // A streamed request whose `stream_options` is such an object gets the
    // usage option in it, not in a second `stream_options`.
    let body =
        json!({"model": "m", "stream": true, "stream_options": {marker: "x"}, "messages": []});
    post_json(&p.url("/v1/chat/completions"), &body.to_string()).await;
    let sent = up.stats.last_request_body().unwrap();
    let sent = llm_proxy_core::value_from_slice(&sent).expect("one stream_options");
    assert_eq!(
        sent["stream_options"],
        json!({marker: "x", "include_usage": true})
    );
}

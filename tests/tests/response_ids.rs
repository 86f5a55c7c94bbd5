//! Response ids are never taken from their owner: an answer that carries
//! an id another key (or another upstream) holds changes nothing, however
//! the client made the upstream reuse it (vLLM's `request_id`, its
//! `x-request-id` naming of chat completions), in memory and on Redis.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use http::Method;
use tests::redis_server::RedisServer;
use tests::*;

const ALL_APIS: &str =
    "apis = [\"chat_completions\", \"completions\", \"embeddings\", \"responses\", \"messages\"]";

/// An upstream that behaves as vLLM's Responses server does: the response's
/// `id` is the request's `request_id` when the client gives one, a stored
/// response is kept under that id unless `store` is false, and
/// `GET /v1/responses/{id}` reads it back. A streamed request is answered
/// with events.
async fn vllm_like_upstream() -> std::net::SocketAddr {
    responses_upstream("text/event-stream").await
}

/// [`vllm_like_upstream`], whose streams go under `stream_type`.
async fn responses_upstream(stream_type: &'static str) -> std::net::SocketAddr {
    let store: Arc<Mutex<HashMap<String, serde_json::Value>>> = Arc::default();
    let counter = Arc::new(std::sync::atomic::AtomicU64::new(0));
    raw_upstream(move |mut conn| {
        let store = store.clone();
        let counter = counter.clone();
        async move {
            use tokio::io::AsyncWriteExt;
            let Some((head, body)) = read_request(&mut conn).await else {
                return;
            };
            let line = head.lines().next().unwrap_or_default().to_owned();
            let mut parts = line.split(' ');
            let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let (status, text) = if method == "POST" && path == "/v1/responses" {
                let req: serde_json::Value = serde_json::from_slice(&body).unwrap();
                let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let id = req["request_id"]
                    .as_str()
                    .map_or_else(|| format!("resp_{n:032x}feedface"), str::to_owned);
                let answer = serde_json::json!({
                    "id": id, "object": "response", "status": "completed", "model": req["model"],
                    "output": [{"type": "message", "id": format!("msg_{n}"), "role": "assistant",
                        "content": [{"type": "output_text", "text": format!("echo: {}", req["input"])}]}],
                    "usage": {"input_tokens": 1, "output_tokens": 1, "total_tokens": 2}
                });
                if req["store"] != serde_json::Value::Bool(false) {
                    store.lock().unwrap().insert(id.clone(), answer.clone());
                }
                if req["stream"] == serde_json::Value::Bool(true) {
                    let created = serde_json::json!({"type": "response.created", "sequence_number": 0,
                        "response": {"id": id, "object": "response", "status": "in_progress"}});
                    let done = serde_json::json!({"type": "response.completed", "sequence_number": 1,
                        "response": answer});
                    let text = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: {stream_type}\r\nconnection: close\r\n\r\n\
                         event: response.created\ndata: {created}\n\n\
                         event: response.completed\ndata: {done}\n\n"
                    );
                    let _ = conn.write_all(text.as_bytes()).await;
                    return;
                }
                (200, answer.to_string())
            } else if let Some(id) = path.strip_prefix("/v1/responses/") {
                match store.lock().unwrap().get(id) {
                    Some(found) => (200, found.to_string()),
                    None => (
                        404,
                        r#"{"error":{"message":"not found","type":"invalid_request_error","param":null,"code":null}}"#
                            .to_owned(),
                    ),
                }
            } else {
                (
                    404,
                    r#"{"error":{"message":"no route","type":"invalid_request_error","param":null,"code":null}}"#
                        .to_owned(),
                )
            };
            let head = format!(
                "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                text.len()
            );
            let _ = conn.write_all(head.as_bytes()).await;
            let _ = conn.write_all(text.as_bytes()).await;
        }
    })
    .await
}

/// A chat completions server as vLLM's: the completion's id is
/// `chatcmpl-<x-request-id>` when the client sends that header.
async fn vllm_like_chat_upstream() -> std::net::SocketAddr {
    raw_upstream(|mut conn| async move {
        use tokio::io::AsyncWriteExt;
        let Some((head, _body)) = read_request(&mut conn).await else {
            return;
        };
        let rid = head_value(&head, "x-request-id").unwrap_or("random");
        let text = serde_json::json!({
            "id": format!("chatcmpl-{rid}"), "object": "chat.completion", "created": 1, "model": "c",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
        })
        .to_string();
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            text.len()
        );
        let _ = conn.write_all(head.as_bytes()).await;
        let _ = conn.write_all(text.as_bytes()).await;
    })
    .await
}

/// A proxy in front of the upstream at `up` (every API), with
/// [`two_keys`].
async fn keyed_proxy(up: std::net::SocketAddr, auth: &str) -> TestProxy {
    proxy(&keyed_config(up, auth)).await
}

/// [`keyed_proxy`]'s config.
fn keyed_config(up: std::net::SocketAddr, auth: &str) -> String {
    format!(
        "{}\n{}",
        one_upstream(&format!("http://{up}/v1"), ALL_APIS),
        two_keys(auth)
    )
}

/// An `[auth]` backend on the Redis at `url`, its keys under `prefix`
/// (which the id map then shares).
fn on_redis(url: &str, prefix: &str) -> String {
    format!("backend = \"redis\"\nredis_url = \"{url}\"\nkey_prefix = \"{prefix}\"\n")
}

/// The response id of a streamed answer's `response.created` event.
fn created_id(answer: &Answer) -> String {
    let created: serde_json::Value =
        serde_json::from_str(&sse_data(answer.body.as_ref())[0]).unwrap();
    created["response"]["id"].as_str().unwrap().to_owned()
}

/// Keys `sk-a` and `sk-b`; `auth` goes into the `[auth]` section (a Redis
/// backend, whose Redis the id map then shares).
fn two_keys(auth: &str) -> String {
    format!(
        "[auth]\n{auth}[[auth.keys]]\nname = \"a\"\nkey = \"sk-a\"\n[[auth.keys]]\nname = \"b\"\nkey = \"sk-b\"\n"
    )
}

async fn post(url: &str, body: serde_json::Value, key: &str, extra: &[(&str, &str)]) -> Answer {
    let auth = format!("Bearer {key}");
    let mut headers = vec![
        ("content-type", "application/json"),
        ("authorization", &auth),
    ];
    headers.extend_from_slice(extra);
    send(request(Method::POST, url, &headers, body.to_string())).await
}

async fn get(url: &str, key: &str) -> Answer {
    let auth = format!("Bearer {key}");
    send(request(Method::GET, url, &[("authorization", &auth)], "")).await
}

/// Key a creates a stored response through `p`: its id.
async fn a_creates(p: &TestProxy) -> String {
    let created = post(
        &p.url("/v1/responses"),
        serde_json::json!({"model": "m", "input": "a's secret plan"}),
        "sk-a",
        &[],
    )
    .await;
    assert_eq!(created.status, 200, "{}", created.text());
    created.json()["id"].as_str().unwrap().to_owned()
}

/// Key a's response, then key b's attempt to take its id by making the
/// upstream answer with it: a keeps it, b can read none of it.
async fn a_keeps_its_id(redis: &str) {
    let up = vllm_like_upstream().await;
    let p = keyed_proxy(up, redis).await;
    let id = a_creates(&p).await;
    let url = p.url(&format!("/v1/responses/{id}"));
    eventually_status(&url, "sk-a", 200).await;
    let hijack = post(
        &p.url("/v1/responses"),
        serde_json::json!({"model": "m", "input": "x", "store": false, "request_id": id}),
        "sk-b",
        &[],
    )
    .await;
    assert_eq!(hijack.status, 200, "{}", hijack.text());
    // (Time for a claim on Redis to be refused.)
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    get(&url, "sk-b")
        .await
        .assert_error(404, "not_found_error", "response_not_found");
    let read = get(&url, "sk-a").await;
    assert_eq!(read.status, 200, "{}", read.text());
    assert!(read.text().contains("a's secret plan"));
}

/// `GET url` as `key` answers `status`, once an id recorded in the
/// background has landed.
async fn eventually_status(url: &str, key: &str, status: u16) {
    let started = std::time::Instant::now();
    while started.elapsed() < HANG {
        if get(url, key).await.status == status {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("{url} never answered {status}");
}

#[tokio::test]
async fn an_id_is_never_taken_from_its_owner() {
    a_keeps_its_id("").await;
}

#[tokio::test]
async fn an_id_is_never_taken_from_its_owner_on_redis() {
    let redis = RedisServer::start().await;
    a_keeps_its_id(&on_redis(&redis.url(), "ids:")).await;
}

/// The same through a client-chosen `x-request-id` and translation: b's
/// translated answer carries a's id, and a keeps its response.
#[tokio::test]
async fn an_id_made_again_through_x_request_id_stays_its_owners() {
    let native = vllm_like_upstream().await;
    let chat = vllm_like_chat_upstream().await;
    let p = proxy(&format!(
        "[[upstream]]\nname = \"native\"\nurl = \"http://{native}/v1\"\nmodels = [\"m\"]\n{ALL_APIS}\n\
         [[upstream]]\nname = \"chat\"\nurl = \"http://{chat}/v1\"\nmodels = [\"c\"]\napis = [\"chat_completions\"]\n{}",
        two_keys("")
    ))
    .await;
    let id = a_creates(&p).await;
    let bare = id.strip_prefix("resp_").unwrap();
    let again = post(
        &p.url("/v1/responses"),
        serde_json::json!({"model": "c", "input": "x", "store": false}),
        "sk-b",
        &[("x-request-id", bare)],
    )
    .await;
    assert_eq!(again.status, 200, "{}", again.text());
    assert_eq!(again.json()["id"], id.as_str(), "b's answer carries a's id");
    let read = get(&p.url(&format!("/v1/responses/{id}")), "sk-a").await;
    assert_eq!(read.status, 200, "a lost its response: {}", read.text());
}

/// An id recorded while Redis could not be asked is held unconfirmed: once
/// Redis answers again, its record wins. (Key b made the upstream answer
/// with an id Redis gives to key a: b does not get it.)
#[tokio::test]
async fn an_id_recorded_while_redis_was_away_yields_to_redis() {
    let up = vllm_like_upstream().await;
    let mut redis = RedisServer::start().await;
    let url = redis.url();
    redis.stop();
    let p = keyed_proxy(up, &on_redis(&url, "away:")).await;
    let id = "resp_0123456789abcdef";
    let answer = post(
        &p.url("/v1/responses"),
        serde_json::json!({"model": "m", "input": "x", "request_id": id}),
        "sk-b",
        &[],
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    // Redis comes back, holding the id as key a's.
    redis.restart().await;
    let mut admin = redis::Client::open(url.as_str())
        .expect("a client")
        .get_multiplexed_async_connection()
        .await
        .expect("connected");
    redis::cmd("SET")
        .arg(format!("away:resp:{id}"))
        .arg("up\u{1f}a")
        .query_async::<()>(&mut admin)
        .await
        .expect("set");
    // Until the link reconnects, memory answers; then Redis does.
    let by_id = p.url(&format!("/v1/responses/{id}"));
    for _ in 0..200 {
        if get(&by_id, "sk-b").await.status == 404 {
            let a = get(&by_id, "sk-a").await;
            assert_eq!(a.status, 200, "{}", a.text());
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("key b kept an id Redis gives to key a");
}

/// An answer the upstream does not keep (`"store": false`) is not recorded:
/// its id can be neither fetched nor continued, and would only take a place
/// in the map (and in Redis, for a week) from ids that can.
#[tokio::test]
async fn an_unstored_answers_id_is_not_recorded() {
    let up = vllm_like_upstream().await;
    let p = keyed_proxy(up, "").await;
    let made = post(
        &p.url("/v1/responses"),
        serde_json::json!({"model": "m", "input": "x", "store": false}),
        "sk-a",
        &[],
    )
    .await;
    assert_eq!(made.status, 200, "{}", made.text());
    let id = made.json()["id"].as_str().unwrap().to_owned();
    // The proxy's own 404, not the upstream's: the request never left.
    get(&p.url(&format!("/v1/responses/{id}")), "sk-a")
        .await
        .assert_error(404, "not_found_error", "response_not_found");
    let stored = a_creates(&p).await;
    eventually_status(&p.url(&format!("/v1/responses/{stored}")), "sk-a", 200).await;
}

/// One key making response after response pushes out only its own ids once
/// the map is full: the other key's stay found (without Redis, an id pushed
/// out is a 404).
#[tokio::test]
async fn a_key_making_many_responses_pushes_out_only_its_own_ids() {
    let up = vllm_like_upstream().await;
    let p = proxy(&format!(
        "max_response_ids = 4\n{}\n{}",
        one_upstream(&format!("http://{up}/v1"), ALL_APIS),
        two_keys("")
    ))
    .await;
    let mine = [a_creates(&p).await, a_creates(&p).await];
    let mut theirs = Vec::new();
    for n in 0..12 {
        let made = post(
            &p.url("/v1/responses"),
            serde_json::json!({"model": "m", "input": format!("flood {n}")}),
            "sk-b",
            &[],
        )
        .await;
        assert_eq!(made.status, 200, "{}", made.text());
        theirs.push(made.json()["id"].as_str().unwrap().to_owned());
    }
    for id in &mine {
        let read = get(&p.url(&format!("/v1/responses/{id}")), "sk-a").await;
        assert_eq!(read.status, 200, "{id}: {}", read.text());
    }
    for id in &theirs[10..] {
        let read = get(&p.url(&format!("/v1/responses/{id}")), "sk-b").await;
        assert_eq!(read.status, 200, "{id}: {}", read.text());
    }
    get(&p.url(&format!("/v1/responses/{}", theirs[0])), "sk-b")
        .await
        .assert_error(404, "not_found_error", "response_not_found");
}

/// An id made while Redis was away is claimed there once it is back, so a
/// second proxy on that Redis finds it; while Redis cannot be asked, an id
/// only it could place is a 503 to retry, not a 404.
#[tokio::test]
async fn an_id_made_while_redis_was_away_reaches_it_once_it_is_back() {
    let up = vllm_like_upstream().await;
    let mut redis = RedisServer::start().await;
    let url = redis.url();
    redis.stop();
    let config = keyed_config(up, &on_redis(&url, "blip:"));
    let (made_here, elsewhere) = (proxy(&config).await, proxy(&config).await);
    let id = a_creates(&made_here).await;
    let url_elsewhere = elsewhere.url(&format!("/v1/responses/{id}"));
    let away = get(&url_elsewhere, "sk-a").await;
    away.assert_error(503, "service_unavailable", "id_store_unavailable");
    assert_eq!(away.header("retry-after"), Some("1"));
    // Where it was made, memory knows it.
    let here = get(&made_here.url(&format!("/v1/responses/{id}")), "sk-a").await;
    assert_eq!(here.status, 200, "{}", here.text());
    redis.restart().await;
    eventually_status(&url_elsewhere, "sk-a", 200).await;
    get(&url_elsewhere, "sk-b")
        .await
        .assert_error(404, "not_found_error", "response_not_found");
}

/// A stored response read back as a stream (`GET /v1/responses/{id}
/// ?stream=true`, how a client resumes a background response) that the
/// upstream cuts short ends as a created one's does: the `error` event,
/// numbered after the stream's, and a close, never a clean end.
#[tokio::test]
async fn a_response_read_back_as_a_stream_and_cut_short_is_no_clean_end() {
    let up = raw_upstream(|mut conn| async move {
        use tokio::io::AsyncWriteExt;
        let Some((head, _body)) = read_request(&mut conn).await else {
            return;
        };
        let answer = if head.starts_with("POST") {
            let text = r#"{"id":"resp_cut","object":"response","status":"queued","background":true,"output":[]}"#;
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
                text.len()
            )
        } else {
            // Two events, then a clean close: no `response.completed`.
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n\
             event: response.created\ndata: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\":\"resp_cut\",\"status\":\"in_progress\",\"output\":[]}}\n\n\
             event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"sequence_number\":1,\"item_id\":\"m\",\"output_index\":0,\"content_index\":0,\"delta\":\"hel\"}\n\n"
                .to_owned()
        };
        let _ = conn.write_all(answer.as_bytes()).await;
    })
    .await;
    let p = proxy(&format!(
        "[[upstream]]\nname = \"up\"\nurl = \"http://{up}/v1\"\napis = [\"responses\"]\n"
    ))
    .await;
    let created = post(
        &p.url("/v1/responses"),
        serde_json::json!({"model": "m", "input": "hi", "background": true}),
        "none",
        &[],
    )
    .await;
    assert_eq!(created.json()["id"], "resp_cut", "{}", created.text());
    let bytes = a_broken_stream(request(
        Method::GET,
        &p.url("/v1/responses/resp_cut?stream=true&starting_after=0"),
        &[],
        "",
    ))
    .await;
    let text = String::from_utf8_lossy(&bytes);
    let last = sse_data(&bytes).last().cloned().unwrap_or_default();
    let last: serde_json::Value = serde_json::from_str(&last).unwrap();
    assert_eq!(last["type"], "error", "{text}");
    assert_eq!(last["code"], "stream_interrupted", "{text}");
    assert_eq!(last["sequence_number"], 2, "{text}");
}

/// An answer translated from chat completions is kept nowhere (it says
/// `"store": false`): its id is not recorded, though the client left
/// `store` out (the SDKs' default), and takes no place from ids that can
/// be fetched. Fetching it is the proxy's own 404.
#[tokio::test]
async fn a_translated_answers_id_is_not_recorded() {
    let chat = vllm_like_chat_upstream().await;
    let p = proxy(&format!(
        "{}\n{}",
        one_upstream(
            &format!("http://{chat}/v1"),
            "apis = [\"chat_completions\"]"
        ),
        two_keys("")
    ))
    .await;
    let made = post(
        &p.url("/v1/responses"),
        serde_json::json!({"model": "m", "input": "x"}),
        "sk-a",
        &[],
    )
    .await;
    assert_eq!(made.status, 200, "{}", made.text());
    assert_eq!(made.json()["store"], false);
    let id = made.json()["id"].as_str().unwrap().to_owned();
    get(&p.url(&format!("/v1/responses/{id}")), "sk-a")
        .await
        .assert_error(404, "not_found_error", "response_not_found");
}

/// A request only an upstream that keeps responses can serve (`store`,
/// `background`), while that upstream is down and a chat-completions
/// upstream serves the model by translation: the client gets the native
/// upstream's failure (a 502 its SDK retries), not the translation's 400
/// telling it to change its request. What needs nothing kept is served by
/// the translation meanwhile.
#[tokio::test]
async fn a_request_for_kept_state_gets_its_native_upstreams_failure() {
    let chat = vllm_like_chat_upstream().await;
    let native = dead_port().await;
    let p = proxy(&format!(
        "[[upstream]]\nname = \"native\"\nurl = \"http://127.0.0.1:{native}/v1\"\napis = [\"responses\"]\n\
         [[upstream]]\nname = \"chat\"\nurl = \"http://{chat}/v1\"\napis = [\"chat_completions\"]\n"
    ))
    .await;
    for extra in [
        serde_json::json!({"store": true}),
        serde_json::json!({"background": true, "store": true}),
    ] {
        let mut body = serde_json::json!({"model": "m", "input": "x"});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let failed = post(&p.url("/v1/responses"), body, "none", &[]).await;
        assert_eq!(failed.status, 502, "{extra}: {}", failed.text());
    }
    let served = post(
        &p.url("/v1/responses"),
        serde_json::json!({"model": "m", "input": "x"}),
        "none",
        &[],
    )
    .await;
    assert_eq!(served.status, 200, "{}", served.text());
    assert_eq!(served.header("x-llm-proxy-upstream"), Some("chat"));
}

/// A stream that comes without the `text/event-stream` type (Starlette's
/// `StreamingResponse` sends none unless told, others `text/plain`; the
/// SDKs read its events all the same) is read for its id as a stream: the
/// response is found after.
#[tokio::test]
async fn a_stream_under_another_media_type_has_its_id_recorded() {
    let up = responses_upstream("text/plain").await;
    let p = keyed_proxy(up, "").await;
    let made = post(
        &p.url("/v1/responses"),
        serde_json::json!({"model": "m", "input": "x", "stream": true}),
        "sk-a",
        &[],
    )
    .await;
    assert_eq!(made.status, 200, "{}", made.text());
    let id = created_id(&made);
    let read = get(&p.url(&format!("/v1/responses/{id}")), "sk-a").await;
    assert_eq!(read.status, 200, "{}", read.text());
}

/// Two proxies on one Redis, behind a load balancer: a client that has seen
/// a new response's id may follow it up at once through the other proxy.
/// The id reaches the client only once Redis holds its claim (here Redis
/// takes writes late: the answer waits for it).
#[tokio::test]
async fn a_new_id_reaches_its_client_only_once_redis_holds_it() {
    let redis = RedisServer::start().await;
    let up = vllm_like_upstream().await;
    let config = keyed_config(up, &on_redis(&redis.url(), "ids:"));
    let (one, two) = (proxy(&config).await, proxy(&config).await);
    let mut admin = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    for stream in [false, true] {
        // Writes wait 150 ms (within the proxy's 250 ms for a call);
        // reads go on.
        let () = redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(150)
            .arg("WRITE")
            .query_async(&mut admin)
            .await
            .unwrap();
        let made = post(
            &one.url("/v1/responses"),
            serde_json::json!({"model": "m", "input": "x", "stream": stream}),
            "sk-a",
            &[],
        )
        .await;
        assert_eq!(made.status, 200, "{}", made.text());
        let id = if stream {
            created_id(&made)
        } else {
            made.json()["id"].as_str().unwrap().to_owned()
        };
        let read = get(&two.url(&format!("/v1/responses/{id}")), "sk-a").await;
        assert_eq!(read.status, 200, "stream {stream}: {}", read.text());
    }
}

/// An id is remembered `response_id_ttl_days` (30 by default, as long as
/// OpenAI keeps a stored response): its Redis key lives that long.
#[tokio::test]
async fn an_id_lives_its_configured_days_on_redis() {
    let redis = RedisServer::start().await;
    let up = vllm_like_upstream().await;
    let mut admin = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    for (line, days) in [("", 30), ("response_id_ttl_days = 2\n", 2)] {
        let p = proxy(&format!(
            "{line}{}",
            keyed_config(up, &on_redis(&redis.url(), "ids:"))
        ))
        .await;
        let id = a_creates(&p).await;
        let ttl: i64 = redis::cmd("TTL")
            .arg(format!("ids:resp:{id}"))
            .query_async(&mut admin)
            .await
            .unwrap();
        let want = days * 24 * 3600;
        assert!((want - 10..=want).contains(&ttl), "{line}: {ttl}");
    }
}

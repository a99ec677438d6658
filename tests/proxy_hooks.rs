//! Hooks over HTTP against real backend processes: the example backends in Node
//! (`examples/backends/node/backend.js`) and Python (`examples/backends/python/backend.py`)
//! decide for the standalone server; each test runs against both.

mod support;

#[path = "support/binary.rs"]
mod binary;

#[path = "support/backend.rs"]
mod backend;

use std::time::{Duration, Instant};

use backend::{Backend, BACKENDS, SECRET};
use binary::{http_with_body, Server};
use serde_json::json;
use support::{free_port, Client, TempDir};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// A thinws node whose hooks ask `backend`; `extra` flags added.
async fn node(backend: &Backend, extra: &[&str]) -> (Server, TempDir) {
    let dir = TempDir::new("proxy");
    let secret = dir.file("secret", SECRET);
    let (connect, subscribe, publish) = (
        backend.url("connect"),
        backend.url("subscribe"),
        backend.url("publish"),
    );
    let mut args = vec![
        "--proxy-connect-url",
        &connect,
        "--proxy-subscribe-url",
        &subscribe,
        "--proxy-publish-url",
        &publish,
        "--proxy-header",
        "Cookie",
        "--proxy-timeout",
        "1",
        "--proxy-secret-file",
        secret.to_str().unwrap(),
        "--no-demo",
    ];
    args.extend_from_slice(extra);
    (Server::start(&args).await, dir)
}

/// A socket whose upgrade request carries `cookie`.
async fn with_cookie(server: &Server, cookie: Option<&str>) -> Client {
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
            server.url(),
        )
        .unwrap();
    if let Some(cookie) = cookie {
        request
            .headers_mut()
            .insert("Cookie", cookie.parse().unwrap());
    }
    let (ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    Client::from_stream(ws)
}

async fn connect(client: &mut Client) -> serde_json::Value {
    client
        .request(json!({"type": "connect", "connectionID": "whoever"}))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_decides_by_cookie_room_and_message() {
    for example in BACKENDS {
        decides_by_cookie_room_and_message(example).await;
    }
}

async fn decides_by_cookie_room_and_message(example: (&str, &str)) {
    let backend = Backend::start(example, free_port()).await;
    let (server, _secret) = node(&backend, &[]).await;

    // Connect: allowed by a session cookie, named by the backend; refused without one.
    let mut alice = with_cookie(&server, Some("theme=dark; session=alice-session")).await;
    assert_eq!(connect(&mut alice).await["type"], "ack");
    let mut bob = with_cookie(&server, Some("session=bob-session")).await;
    assert_eq!(connect(&mut bob).await["type"], "ack");
    // No cookie, an unknown one, or one named after a JavaScript object's own properties.
    for cookie in [
        None,
        Some("session=nobody"),
        Some("session=constructor"),
        Some("session=__proto__"),
    ] {
        let mut stranger = with_cookie(&server, cookie).await;
        let refused = connect(&mut stranger).await;
        assert_eq!(
            (&refused["code"], &refused["message"]),
            (&json!("forbidden"), &json!("log in first")),
            "{cookie:?}: {refused}"
        );
    }

    // Subscribe: refused with the backend's reason; the meta it attached at connect decides.
    alice.subscribe("private:admins").await;
    alice.subscribe("pro:lounge").await;
    let refused = bob
        .request(json!({"type": "subscribe", "roomID": "private:admins"}))
        .await;
    assert_eq!(refused["message"], "admins only", "{refused}");
    let refused = bob
        .request(json!({"type": "subscribe", "roomID": "pro:lounge"}))
        .await;
    assert_eq!(
        refused["message"], "upgrade to pro for this room",
        "{refused}"
    );
    bob.subscribe("lobby").await;
    alice.subscribe("lobby").await;

    // Rooms the backend put a socket in at connect: alice is in `user:alice` without
    // having subscribed (nor asked /subscribe), so bob can reach her there.
    bob.publish("user:alice", json!("just for you")).await;
    let got = alice.delivery().await;
    assert_eq!(
        (&got["roomID"], &got["payload"]),
        (&json!("user:alice"), &json!("just for you"))
    );

    // Publish: rewritten by the backend, delivered under the identity it assigned.
    alice
        .publish("lobby", json!({"text": "darn, it works"}))
        .await;
    for client in [&mut alice, &mut bob] {
        let got = client.delivery().await;
        assert_eq!(got["connectionID"], "alice");
        assert_eq!(got["payload"], json!({"text": "****, it works"}));
    }

    // A call that is not signed with the secret is refused by the backend.
    let forged = r#"{"event":"connect","node":"x","socket":{"id":"1","identity":null}}"#;
    let (status, _) = http_with_body(
        format!("127.0.0.1:{}", backend.port).parse().unwrap(),
        "POST",
        "/thinws/connect",
        &[
            ("X-Thinws-Timestamp", "1"),
            ("X-Thinws-Signature", "v1=00"),
            ("Cookie", "session=alice-session"),
        ],
        forged,
    )
    .await;
    assert_eq!(status, 401);
}

/// With `--proxy-connect-url` the backend decides who a socket is: a socket that has not
/// connected is refused in every room (those that do not ask the backend included), and
/// closed with 1008 once `--auth-grace` has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_must_connect_first_when_the_backend_decides_identities() {
    let backend = Backend::start(BACKENDS[0], free_port()).await;
    let args = ["--proxy-room-prefix", "private:", "--auth-grace", "1"];
    let (server, _secret) = node(&backend, &args).await;
    let mut stranger = with_cookie(&server, Some("session=alice-session")).await;
    for frame in [
        json!({"type": "subscribe", "roomID": "lobby"}),
        json!({"type": "message", "roomID": "lobby", "payload": 1}),
        json!({"type": "subscribe", "roomID": "private:admins"}),
    ] {
        let reply = stranger.request(frame.clone()).await;
        assert_eq!(
            (&reply["code"], &reply["message"]),
            (&json!("forbidden"), &json!("connect first")),
            "{frame}: {reply}"
        );
    }
    assert_eq!(stranger.closed().await, CloseCode::Policy);
    // A socket that connected uses its rooms as before.
    let mut alice = with_cookie(&server, Some("session=alice-session")).await;
    assert_eq!(connect(&mut alice).await["type"], "ack");
    alice.subscribe("lobby").await;
    alice.publish("lobby", json!("hi")).await;
    assert_eq!(alice.delivery().await["connectionID"], "alice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_is_down_means_unavailable_and_the_socket_goes_on() {
    for example in BACKENDS {
        down_means_unavailable(example).await;
    }
}

async fn down_means_unavailable(example: (&str, &str)) {
    let port = free_port();
    let backend = Backend::start(example, port).await;
    let (server, _secret) = node(&backend, &["--proxy-room-prefix", "private:"]).await;
    let mut alice = with_cookie(&server, Some("session=alice-session")).await;
    assert_eq!(connect(&mut alice).await["type"], "ack");
    alice.subscribe("private:admins").await;
    alice.subscribe("lobby").await;

    drop(backend);
    // Asking the backend fails within the timeout: nothing happened.
    let started = Instant::now();
    let reply = alice
        .request(json!({"type": "message", "roomID": "private:admins", "payload": "x"}))
        .await;
    assert_eq!(reply["code"], "unavailable", "{reply}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // A room that does not ask the backend costs no call, and works.
    alice.publish("lobby", json!("still here")).await;
    assert_eq!(alice.delivery().await["payload"], "still here");

    // Back: asked again.
    let _backend = Backend::start(example, port).await;
    alice
        .publish("private:admins", json!({"text": "darn"}))
        .await;
    assert_eq!(alice.delivery().await["payload"], json!({"text": "****"}));
}

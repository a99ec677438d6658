//! The examples, exercised over real sockets: each example file is compiled into this test
//! as a module, so the code under test is the example's own.

mod support;

#[allow(dead_code)]
#[path = "../examples/axum_auth.rs"]
mod axum_auth;
#[allow(dead_code)]
#[path = "../examples/axum_chat.rs"]
mod axum_chat;
#[allow(dead_code)]
#[path = "../examples/hyper.rs"]
mod hyper_example;
#[allow(dead_code)]
#[path = "../examples/warp.rs"]
mod warp_example;

use serde_json::json;
use support::{http, Client, RedisServer, UPGRADE};
use thinws::ThinWsLayer;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

async fn serve_axum(app: axum::Router) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// POSTs JSON and returns the status.
async fn post_json(addr: std::net::SocketAddr, path: &str, body: &str) -> u16 {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut tcp, &mut response)
        .await
        .unwrap();
    String::from_utf8_lossy(&response)
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axum_chat_publishes_from_a_post_handler_on_node_a_to_a_socket_on_node_b() {
    let redis = RedisServer::start().await;
    let layer = || axum_chat::settings().redis_url(redis.url()).build();
    let a = serve_axum(axum_chat::app(layer())).await;
    let b = serve_axum(axum_chat::app(layer())).await;
    assert_eq!(http(a, "GET", "/", &[]).await.0, 200);
    let mut on_b = Client::connect(&format!("ws://{b}/")).await;
    on_b.subscribe("lobby").await;
    // The app announces joins: the socket hears its own.
    assert_eq!(on_b.recv().await["type"], "join");
    assert_eq!(
        post_json(a, "/rooms/lobby/messages", r#"{"text":"from http"}"#).await,
        202
    );
    let got = on_b.delivery().await;
    assert_eq!(got["payload"], json!({"text": "from http"}));
    assert_eq!(got["roomID"], "lobby");
    assert_eq!(got["connectionID"], "server");
    // Who is in the room, asked over HTTP on the other node.
    let (status, body) = http(a, "GET", "/rooms/lobby/members", &[]).await;
    assert_eq!(status, 200, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["count"], 1, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_without_sockets_publishes_with_only_a_redis_url() {
    let redis = RedisServer::start().await;
    let node = serve_axum(axum_chat::app(ThinWsLayer::new(redis.url()))).await;
    let mut c = Client::connect(&format!("ws://{node}/")).await;
    c.subscribe("reports").await;
    let publisher = thinws::Publisher::builder(redis.url())
        .sender_id("cron")
        .build()
        .unwrap();
    publisher
        .publish("reports", &json!({"done": true}))
        .await
        .unwrap();
    let got = c.delivery().await;
    assert_eq!(
        got,
        json!({"type": "message", "roomID": "reports", "connectionID": "cron", "payload": {"done": true}})
    );
    // With a custom prefix on both sides.
    let prefixed = ThinWsLayer::builder()
        .redis_url(redis.url())
        .key_prefix("p:")
        .build();
    let node = serve_axum(axum_chat::app(prefixed)).await;
    let mut c = Client::connect(&format!("ws://{node}/")).await;
    c.subscribe("r").await;
    thinws::Publisher::builder(redis.url())
        .key_prefix("p:")
        .build()
        .unwrap()
        .publish("r", "plain")
        .await
        .unwrap();
    assert_eq!(c.delivery().await["payload"], "plain");
}

#[tokio::test]
async fn axum_auth_refuses_without_a_token_and_binds_the_socket_to_the_user() {
    let users = axum_auth::demo_users();
    let addr = serve_axum(axum_auth::app(
        users,
        axum_auth::thinws_layer(ThinWsLayer::builder()),
    ))
    .await;
    // No token: 401 before any socket exists.
    let (status, _) = http(addr, "GET", "/", &UPGRADE).await;
    assert_eq!(status, 401);
    let (status, _) = http(addr, "GET", "/?access_token=wrong", &UPGRADE).await;
    assert_eq!(status, 401);

    // With a token (query string, as a browser would), whatever connectionID is claimed,
    // the socket is alice.
    let mut alice =
        Client::connect_as(&format!("ws://{addr}/?access_token=alice-token"), "mallory").await;
    alice.subscribe("alice-private").await;
    alice.subscribe("general").await;
    alice.publish("general", json!("hi")).await;
    assert_eq!(alice.delivery().await["connectionID"], "alice");

    // With a header, bob may not join alice's room.
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!(
            "ws://{addr}/"
        ))
        .unwrap();
    request
        .headers_mut()
        .insert("authorization", "Bearer bob-token".parse().unwrap());
    let (ws, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(response.status(), 101);
    drop(ws);
    let mut bob = Client::connect(&format!("ws://{addr}/?access_token=bob-token")).await;
    let reply = bob
        .request(json!({"type": "subscribe", "roomID": "alice-private"}))
        .await;
    assert_eq!(reply["code"], "forbidden");
    assert_eq!(reply["message"], "bob may not join alice-private");
}

#[tokio::test]
async fn warp_example_serves_routes_and_sockets() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(warp_example::serve(listener, ThinWsLayer::in_memory()));
    assert_eq!(
        http(addr, "GET", "/", &[]).await,
        (200, "hello from warp".into())
    );
    assert_eq!(
        http(addr, "GET", "/hello/ann", &[]).await,
        (200, "hello, ann".into())
    );
    let mut a = Client::connect(&format!("ws://{addr}/")).await;
    let mut b = Client::connect(&format!("ws://{addr}/hello/x")).await;
    a.subscribe("w").await;
    b.publish("w", json!("via warp")).await;
    assert_eq!(a.delivery().await["payload"], "via warp");
}

#[tokio::test]
async fn hyper_example_serves_sockets_on_its_path() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(hyper_example::serve(
        listener,
        ThinWsLayer::builder().path("/ws").build(),
    ));
    assert_eq!(
        http(addr, "GET", "/ws", &[]).await,
        (200, "hello from hyper at /ws".into())
    );
    let mut a = Client::connect(&format!("ws://{addr}/ws")).await;
    a.subscribe("h").await;
    a.publish("h", json!("via hyper")).await;
    assert_eq!(a.delivery().await["payload"], "via hyper");
}

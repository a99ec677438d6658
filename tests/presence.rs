//! Presence (protocol 1.1): who is in a room across nodes, `join` and `leave` events exactly
//! once per transition, a node killed with SIGKILL whose members leave within the presence
//! TTL, and a Redis restart after which the nodes rebuild presence without duplicates. All
//! on private `redis-server`s, real sockets and (for the kill) real `thinws` processes.

mod support;

#[path = "support/binary.rs"]
mod binary;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use binary::Server;
use serde_json::json;
use support::{Client, Node, RedisServer};
use thinws::settings::{Presence, RoomSettings};
use thinws::ThinWsLayer;

fn layer(redis: Option<&RedisServer>, ttl: Duration) -> ThinWsLayer {
    let builder = ThinWsLayer::builder()
        .rate_limit(0, 0)
        .presence(Presence::WithJoinLeave)
        .presence_ttl(ttl)
        .room_settings("quiet:*", RoomSettings::with_presence(Presence::On))
        .room_settings("plain", RoomSettings::default());
    match redis {
        Some(redis) => builder.redis_url(redis.url()).build(),
        None => builder.build(),
    }
}

/// The next `join` or `leave` of `room` this client receives, as `"join alice"`.
async fn event(c: &mut Client, room: &str) -> String {
    loop {
        let v = c.recv().await;
        if (v["type"] == "join" || v["type"] == "leave") && v["roomID"] == room {
            return format!(
                "{} {}",
                v["type"].as_str().unwrap(),
                v["connectionID"].as_str().unwrap()
            );
        }
    }
}

async fn events(c: &mut Client, room: &str, expected: &[&str]) {
    for want in expected {
        assert_eq!(event(c, room).await, *want, "events of {room}");
    }
}

/// The `presence` reply, with its members sorted.
async fn presence(c: &mut Client, room: &str) -> (u64, Vec<String>) {
    let reply = c.request(json!({"type": "presence", "roomID": room})).await;
    assert_eq!(reply["type"], "ack", "{reply}");
    let mut members: Vec<String> = serde_json::from_value(reply["members"].clone()).unwrap();
    members.sort();
    (reply["count"].as_u64().unwrap(), members)
}

fn sorted(names: &[&str]) -> (u64, Vec<String>) {
    let mut names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    names.sort();
    (names.len() as u64, names)
}

/// The scenario on three nodes (or one, three times, in memory).
async fn exact_across_nodes(nodes: [&Node; 3]) {
    let mut watcher = Client::connect_as(&nodes[0].url(), "watcher").await;
    watcher.subscribe("lobby").await;
    let mut alice = Client::connect_as(&nodes[0].url(), "alice").await;
    alice.subscribe("lobby").await;
    let mut bob = Client::connect_as(&nodes[1].url(), "bob").await;
    bob.subscribe("lobby").await;
    let mut carol = Client::connect_as(&nodes[2].url(), "carol").await;
    carol.subscribe("lobby").await;
    // A second socket of alice, on another node: one member, no second join.
    let mut alice2 = Client::connect_as(&nodes[2].url(), "alice").await;
    alice2.subscribe("lobby").await;
    let all = sorted(&["watcher", "alice", "bob", "carol"]);
    for c in [&mut watcher, &mut bob, &mut carol] {
        assert_eq!(presence(c, "lobby").await, all);
    }
    for node in nodes {
        let mut seen = node.hub.presence("lobby").await.unwrap().unwrap();
        seen.members.sort();
        assert_eq!((seen.count, seen.members), all.clone());
    }
    bob.unsubscribe("lobby").await;
    alice.close().await;
    carol.unsubscribe("lobby").await;
    alice2.close().await;
    let mut dave = Client::connect_as(&nodes[1].url(), "dave").await;
    dave.subscribe("lobby").await;
    // Exactly these events, in this order: no duplicate join for alice, no leave while one
    // of her sockets is still there.
    events(
        &mut watcher,
        "lobby",
        &[
            "join watcher",
            "join alice",
            "join bob",
            "join carol",
            "leave bob",
            "leave carol",
            "leave alice",
            "join dave",
        ],
    )
    .await;
    assert_eq!(
        presence(&mut watcher, "lobby").await,
        sorted(&["watcher", "dave"])
    );
    // A socket without `connect` counts under its server-made identity.
    let mut anonymous = Client::connect(&nodes[2].url()).await;
    anonymous.subscribe("quiet:1").await;
    let (count, members) = presence(&mut anonymous, "quiet:1").await;
    assert_eq!(count, 1);
    assert!(!members[0].is_empty());
    // Presence without join/leave events; and a room without presence at all.
    dave.subscribe("quiet:1").await;
    assert_eq!(presence(&mut dave, "quiet:1").await.0, 2);
    let refused = dave
        .request(json!({"type": "presence", "roomID": "plain"}))
        .await;
    assert_eq!(refused["code"], "not_enabled", "{refused}");
    assert!(nodes[0].hub.presence("plain").await.unwrap().is_none());
    dave.publish("quiet:1", json!("only messages here")).await;
    let first = loop {
        let v = dave.recv().await;
        if v["roomID"] == "quiet:1" {
            break v;
        }
    };
    assert_eq!(
        first["type"], "message",
        "no join event in quiet:1: {first}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_is_exact_across_three_nodes() {
    let redis = RedisServer::start().await;
    let ttl = Duration::from_secs(30);
    let a = Node::start(layer(Some(&redis), ttl)).await;
    let b = Node::start(layer(Some(&redis), ttl)).await;
    let c = Node::start(layer(Some(&redis), ttl)).await;
    exact_across_nodes([&a, &b, &c]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_in_memory_has_the_same_semantics() {
    let node = Node::start(layer(None, Duration::from_secs(30))).await;
    exact_across_nodes([&node, &node, &node]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_identity_joining_on_two_nodes_at_once_is_one_join() {
    let redis = RedisServer::start().await;
    let ttl = Duration::from_secs(30);
    let nodes = [
        Node::start(layer(Some(&redis), ttl)).await,
        Node::start(layer(Some(&redis), ttl)).await,
        Node::start(layer(Some(&redis), ttl)).await,
    ];
    let mut watcher = Client::connect_as(&nodes[2].url(), "watcher").await;
    let mut a = Client::connect_as(&nodes[0].url(), "dana").await;
    let mut b = Client::connect_as(&nodes[1].url(), "dana").await;
    let mut end = Client::connect_as(&nodes[0].url(), "end").await;
    for round in 0..20 {
        let room = format!("race:{round}");
        watcher.subscribe(&room).await;
        tokio::join!(a.subscribe(&room), b.subscribe(&room));
        assert_eq!(
            presence(&mut watcher, &room).await,
            sorted(&["watcher", "dana"])
        );
        tokio::join!(a.unsubscribe(&room), b.unsubscribe(&room));
        end.subscribe(&room).await;
        // One join and one leave for dana, whichever node got there first.
        events(
            &mut watcher,
            &room,
            &["join watcher", "join dana", "leave dana", "join end"],
        )
        .await;
        assert_eq!(presence(&mut end, &room).await, sorted(&["watcher", "end"]));
    }
}

/// A `thinws` process on the private Redis, with join/leave events and a short TTL.
async fn start_binary(redis: &RedisServer, ttl_secs: u64) -> Server {
    let ttl = ttl_secs.to_string();
    Server::start(&[
        "--redis-url",
        &redis.url(),
        "--no-demo",
        "--rate-limit",
        "0",
        "--join-leave",
        "--presence-ttl",
        &ttl,
    ])
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_s_members_leave_within_the_ttl() {
    const TTL: u64 = 2;
    let redis = RedisServer::start().await;
    let mut procs = Vec::new();
    for _ in 0..3 {
        procs.push(start_binary(&redis, TTL).await);
    }
    let mut watcher = Client::connect_as(&procs[0].url(), "watcher").await;
    watcher.subscribe("lobby").await;
    let mut clients = Vec::new();
    // bob and frank only on the node that dies; erin there and on a survivor.
    for (name, node) in [
        ("alice", 1),
        ("bob", 2),
        ("frank", 2),
        ("erin", 2),
        ("erin", 1),
    ] {
        let mut c = Client::connect_as(&procs[node].url(), name).await;
        c.subscribe("lobby").await;
        clients.push(c);
    }
    events(
        &mut watcher,
        "lobby",
        &[
            "join watcher",
            "join alice",
            "join bob",
            "join frank",
            "join erin",
        ],
    )
    .await;
    let killed = Instant::now();
    procs[2].child.kill().unwrap();
    procs[2].child.wait().unwrap();
    let mut left = vec![event(&mut watcher, "lobby").await];
    left.push(event(&mut watcher, "lobby").await);
    let gone_after = killed.elapsed();
    left.sort();
    assert_eq!(left, ["leave bob", "leave frank"]);
    println!("a killed node's members left {gone_after:?} after the SIGKILL (TTL {TTL} s)");
    // Expiry (5/6 of the TTL after the last refresh) plus the next sweep (1/6): the TTL,
    // with a little room for scheduling on a loaded machine.
    assert!(
        gone_after < Duration::from_millis(TTL * 1000 + 750),
        "{gone_after:?}"
    );
    assert_eq!(
        presence(&mut watcher, "lobby").await,
        sorted(&["watcher", "alice", "erin"])
    );
    // Nothing else was announced: erin stays, and the next event is a new join.
    let mut gail = Client::connect_as(&procs[1].url(), "gail").await;
    gail.subscribe("lobby").await;
    events(&mut watcher, "lobby", &["join gail"]).await;
    // Redis agrees: the dead node's share is gone, the survivors' is whole.
    let raw = redis_members(&redis, "lobby").await;
    assert_eq!(raw.len(), 4, "{raw:?}");
    assert_eq!(
        raw["\"erin\""], 1,
        "erin's socket on the dead node is no longer counted"
    );
}

/// The members hash on Redis: identity (as stored, a JSON string) -> sockets.
async fn redis_members(redis: &RedisServer, room: &str) -> HashMap<String, i64> {
    let mut c = redis.client().await;
    redis::cmd("HGETALL")
        .arg(format!("thinws:presence:{{{room}}}"))
        .query_async(&mut c)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_is_rebuilt_by_the_nodes_without_duplicates() {
    let mut redis = RedisServer::start().await;
    let ttl = Duration::from_millis(1200);
    let a = Node::start(layer(Some(&redis), ttl)).await;
    let b = Node::start(layer(Some(&redis), ttl)).await;
    let mut alice = Client::connect_as(&a.url(), "alice").await;
    let mut alice2 = Client::connect_as(&b.url(), "alice").await;
    let mut bob = Client::connect_as(&b.url(), "bob").await;
    for c in [&mut alice, &mut alice2, &mut bob] {
        c.subscribe("lobby").await;
    }
    let before = redis_members(&redis, "lobby").await;
    assert_eq!(
        before,
        HashMap::from([("\"alice\"".into(), 2), ("\"bob\"".into(), 1)])
    );
    redis.restart().await;
    assert!(
        redis_members(&redis, "lobby").await.is_empty(),
        "the data is gone"
    );
    let rebuilt_in = Instant::now();
    support::until("presence to be rebuilt", async || {
        redis_members(&redis, "lobby").await == before
    })
    .await;
    println!(
        "presence rebuilt {:?} after the restart",
        rebuilt_in.elapsed()
    );
    for hub in [&a.hub, &b.hub] {
        let mut seen = hub.presence("lobby").await.unwrap().unwrap();
        seen.members.sort();
        assert_eq!((seen.count, seen.members), sorted(&["alice", "bob"]));
    }
    // And it stays right: leaves after the rebuild are counted against it.
    alice2.close().await;
    bob.unsubscribe("lobby").await;
    support::until("bob and alice's second socket to leave", async || {
        redis_members(&redis, "lobby").await == HashMap::from([("\"alice\"".into(), 1)])
    })
    .await;
    assert_eq!(presence(&mut alice, "lobby").await, sorted(&["alice"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_stopped_with_sigterm_takes_its_members_out_at_once() {
    // A 30 s TTL: a leave within the 10 s deadline of `event` comes from the shutdown, not
    // from expiry.
    let redis = RedisServer::start().await;
    let (a, b) = (
        start_binary(&redis, 30).await,
        start_binary(&redis, 30).await,
    );
    let mut watcher = Client::connect_as(&a.url(), "watcher").await;
    watcher.subscribe("lobby").await;
    let mut hank = Client::connect_as(&b.url(), "hank").await;
    hank.subscribe("lobby").await;
    events(&mut watcher, "lobby", &["join watcher", "join hank"]).await;
    b.terminate();
    events(&mut watcher, "lobby", &["leave hank"]).await;
    assert_eq!(presence(&mut watcher, "lobby").await, sorted(&["watcher"]));
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_are_cut_at_the_maximum_while_the_count_stays_exact() {
    let redis = RedisServer::start().await;
    for redis in [Some(&redis), None] {
        let builder = ThinWsLayer::builder()
            .presence(Presence::On)
            .presence_members_max(2);
        let layer = match redis {
            Some(redis) => builder.redis_url(redis.url()).build(),
            None => builder.build(),
        };
        let node = Node::start(layer).await;
        let mut clients = Vec::new();
        for name in ["a", "b", "c", "d"] {
            let mut c = Client::connect_as(&node.url(), name).await;
            c.subscribe("big").await;
            clients.push(c);
        }
        let (count, members) = presence(&mut clients[0], "big").await;
        assert_eq!(count, 4);
        assert_eq!(members.len(), 2, "{members:?}");
        assert!(members
            .iter()
            .all(|m| ["a", "b", "c", "d"].contains(&m.as_str())));
        assert!(members[0] != members[1], "distinct: {members:?}");
    }
}

/// A refused subscribe changes nothing: an identity whose record is full is refused
/// before its socket joins, so nobody sees it join and leave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribe_refused_for_a_full_identity_is_seen_by_no_one() {
    let redis = RedisServer::start().await;
    for redis in [Some(&redis), None] {
        let builder = ThinWsLayer::builder()
            .presence(Presence::WithJoinLeave)
            .max_rooms_per_socket(2);
        let layer = match redis {
            Some(redis) => builder.redis_url(redis.url()).build(),
            None => builder.build(),
        };
        let node = Node::start(layer).await;
        let mut watcher = Client::connect_as(&node.url(), "watcher").await;
        watcher.subscribe("lobby").await;
        let mut full = Client::connect_as(&node.url(), "full").await;
        full.subscribe("a").await;
        full.subscribe("b").await;
        // Out of its rooms, still bound, its record still holds two rooms.
        let left = full.request(json!({"type": "disconnect"})).await;
        assert_eq!(left["type"], "ack", "{left}");
        let refused = full
            .request(json!({"type": "subscribe", "roomID": "lobby"}))
            .await;
        assert_eq!(refused["code"], "limit_exceeded", "{refused}");
        let mut other = Client::connect_as(&node.url(), "other").await;
        other.subscribe("lobby").await;
        events(&mut watcher, "lobby", &["join watcher", "join other"]).await;
    }
}

/// Long identities: the list is cut at a quarter of the socket's byte bound (as a history
/// page is), so asking does not close the socket that asks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_are_cut_to_the_reply_budget_of_the_socket() {
    let layer = ThinWsLayer::builder()
        .presence(Presence::On)
        .max_queued_bytes(4096)
        .build();
    let node = Node::start(layer).await;
    let mut clients = Vec::new();
    for n in 0..20 {
        let name = format!("{n:02}{}", "x".repeat(248));
        let mut c = Client::connect_as(&node.url(), &name).await;
        c.subscribe("long").await;
        clients.push(c);
    }
    // Each member takes 253 bytes of the 1,024 a reply may carry here.
    let (count, members) = presence(&mut clients[0], "long").await;
    assert_eq!((count, members.len()), (20, 4), "{members:?}");
    let (count, _) = presence(&mut clients[0], "long").await;
    assert_eq!(count, 20, "the socket is still open");
}

/// A member in Redis that thinws did not write (not a JSON string) is named in a clear
/// error, not passed off as Redis being unavailable.
#[tokio::test]
async fn an_unreadable_member_is_an_invalid_member_error() {
    let redis = RedisServer::start().await;
    let layer = layer(Some(&redis), Duration::from_secs(30));
    let hub = layer.hub();
    support::plant_unreadable_presence_member(&redis, "odd").await;
    let err = hub.presence("odd").await.unwrap_err();
    assert!(
        matches!(&err, thinws::PresenceError::InvalidMember { member, .. } if member == "not json"),
        "{err:?}"
    );
}

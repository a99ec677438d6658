//! Production hardening: Redis outages, slow readers, heartbeats, limits and floods, each
//! against real parts (a private redis-server that is killed and restarted, real sockets).

mod support;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use support::{until, within, Client, Node, RedisServer};
use thinws::hooks::{DisconnectEvent, DisconnectReason};
use thinws::{Hub, ThinWsLayer};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tower::service_fn;

fn redis_layer(redis: &RedisServer) -> ThinWsLayer {
    ThinWsLayer::builder()
        .redis_url(redis.url())
        .redis_timeout(Duration::from_millis(500))
        .rate_limit(0, 0)
        .build()
}

async fn wait_health(hub: &Hub, ready: bool) -> Duration {
    let started = Instant::now();
    support::until(&format!("health to become {ready}"), async || {
        hub.health().await.is_ready() == ready
    })
    .await;
    started.elapsed()
}

/// Publishes probes from `publisher` until one reaches every subscriber; returns how long
/// that took. A probe published while a node is still resubscribing never reaches that
/// node's sockets (that is pub/sub), so a fresh probe follows after a short wait.
/// How long until a probe reaches every subscriber again; each subscriber must have been
/// told by a `gap` (room "r" has no history) that it may have missed messages meanwhile.
async fn time_to_resumed_delivery(
    publisher: &mut Client,
    subscribers: &mut [&mut Client],
) -> Duration {
    let started = Instant::now();
    let mut gaps = vec![0; subscribers.len()];
    let resumed = within("delivery to resume", async {
        let mut probe = 0;
        'probe: loop {
            probe += 1;
            let reply = publisher
                .request(json!({"type": "message", "roomID": "r", "payload": {"probe": probe}}))
                .await;
            if reply["type"] != "ack" {
                assert!(
                    reply["code"] == "unavailable" || reply["code"] == "timeout",
                    "{reply}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            for (s, gaps) in subscribers.iter_mut().zip(gaps.iter_mut()) {
                loop {
                    match tokio::time::timeout(Duration::from_millis(200), s.recv()).await {
                        Ok(v) if v["type"] == "gap" => {
                            assert_eq!(v["roomID"], "r", "{v}");
                            *gaps += 1;
                        }
                        Ok(v) if v["payload"]["probe"] == probe => break,
                        Ok(_) => continue, // an earlier probe that made it after all
                        Err(_) => continue 'probe,
                    }
                }
            }
            return started.elapsed();
        }
    })
    .await;
    assert!(
        gaps.iter().all(|&n| n == 1),
        "each subscriber gets one gap: {gaps:?}"
    );
    resumed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_stream_and_restarted_delivery_resumes_on_both_nodes() {
    let mut redis = RedisServer::start().await;
    let a = Node::start(redis_layer(&redis)).await;
    let b = Node::start(redis_layer(&redis)).await;
    let mut on_a = Client::connect(&a.url()).await;
    let mut on_b = Client::connect(&b.url()).await;
    on_a.subscribe("r").await;
    on_b.subscribe("r").await;
    let mut publisher = Client::connect(&a.url()).await;
    for i in 0..100 {
        publisher.publish("r", json!(i)).await;
    }
    for i in 0..100 {
        assert_eq!(on_a.delivery().await["payload"], i);
        assert_eq!(on_b.delivery().await["payload"], i);
    }
    wait_health(&a.hub, true).await;

    redis.kill();
    let unhealthy_after = wait_health(&a.hub, false).await;
    wait_health(&b.hub, false).await;
    println!("health turned unready {unhealthy_after:?} after the kill");
    assert!(
        unhealthy_after < Duration::from_secs(2),
        "{unhealthy_after:?}"
    );
    // No ack for what cannot be published; the socket stays open.
    let reply = publisher
        .request(json!({"type": "message", "roomID": "r", "payload": "during"}))
        .await;
    assert_eq!(reply["code"], "unavailable", "{reply}");
    let reply = publisher
        .request(json!({"type": "subscribe", "roomID": "new"}))
        .await;
    assert_eq!(reply["code"], "unavailable", "{reply}");

    redis.restart().await;
    let resumed = time_to_resumed_delivery(&mut publisher, &mut [&mut on_a, &mut on_b]).await;
    println!("delivery resumed on both nodes {resumed:?} after Redis was back");
    assert!(resumed < Duration::from_secs(3), "{resumed:?}");

    // Healthy again only with live subscriptions: right after both report ready, a message
    // reaches both nodes with no retry.
    wait_health(&a.hub, true).await;
    wait_health(&b.hub, true).await;
    publisher.publish("r", json!("after")).await;
    assert_eq!(on_a.delivery().await["payload"], "after");
    assert_eq!(on_b.delivery().await["payload"], "after");
    // Nothing was written that should not be: anonymous sockets record no keys.
    let mut conn = redis.client().await;
    let keys: Vec<String> = redis::AsyncCommands::keys(&mut conn, "*").await.unwrap();
    assert!(keys.is_empty(), "{keys:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_only_the_pubsub_connections_is_recovered_without_client_action() {
    let redis = RedisServer::start().await;
    let a = Node::start(redis_layer(&redis)).await;
    let b = Node::start(redis_layer(&redis)).await;
    let mut on_a = Client::connect(&a.url()).await;
    let mut on_b = Client::connect(&b.url()).await;
    on_a.subscribe("r").await;
    on_b.subscribe("r").await;
    let mut publisher = Client::connect(&b.url()).await;
    publisher.publish("r", json!("before")).await;
    assert_eq!(on_a.delivery().await["payload"], "before");
    assert_eq!(on_b.delivery().await["payload"], "before");

    let mut conn = redis.client().await;
    let killed: i64 = support::kill_clients(&mut conn, "pubsub").await;
    assert_eq!(killed, 2, "one pub/sub connection per node");
    let resumed = time_to_resumed_delivery(&mut publisher, &mut [&mut on_a, &mut on_b]).await;
    println!("delivery resumed {resumed:?} after CLIENT KILL TYPE pubsub");
    assert!(resumed < Duration::from_secs(3), "{resumed:?}");
    wait_health(&a.hub, true).await;
    let channels: Vec<String> = redis::cmd("PUBSUB")
        .arg("CHANNELS")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(channels, ["thinws:room:{r}"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_stops_reading_is_dropped_and_the_others_get_everything() {
    const MAX_QUEUED: usize = 256 * 1024;
    let node = Node::start(
        ThinWsLayer::builder()
            .rate_limit(0, 0)
            .max_queued_bytes(MAX_QUEUED)
            .outbound_queue(1_000_000)
            .build(),
    )
    .await;
    // The slow reader: a small receive buffer, and it never reads after subscribing.
    let mut slow = Client::connect_with_receive_buffer(&node.url(), node.addr, 4096).await;
    slow.subscribe("r").await;
    let mut readers = Vec::new();
    for _ in 0..3 {
        let mut c = Client::connect(&node.url()).await;
        c.subscribe("r").await;
        readers.push(c);
    }
    assert_eq!(node.hub.socket_count(), 4);

    // Watch the node's queued bytes while the flood runs.
    let hub = node.hub.clone();
    let peak = Arc::new(Mutex::new(0usize));
    let watcher = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                let queued = hub.queued_bytes();
                {
                    let mut p = peak.lock().unwrap();
                    *p = (*p).max(queued);
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };

    const N: usize = 20_000;
    let payload = "x".repeat(1024);
    let mut publisher = Client::connect(&node.url()).await;
    let sender = tokio::spawn(async move {
        for i in 0..N {
            publisher
                .send_text(json!({"type": "message", "messageID": i, "roomID": "r", "payload": {"i": i, "pad": payload}}).to_string())
                .await;
        }
        for i in 0..N {
            assert_eq!(publisher.reply_to(&json!(i)).await["type"], "ack");
        }
        publisher
    });
    let mut receivers = Vec::new();
    for mut c in readers {
        receivers.push(tokio::spawn(async move {
            for i in 0..N {
                let v = c.delivery().await;
                assert_eq!(
                    v["payload"]["i"], i,
                    "a fast reader lost or reordered a message"
                );
            }
            c
        }));
    }
    // Keep every client open until the end.
    let mut open = vec![within("the publisher", sender).await.unwrap()];
    for r in receivers {
        open.push(within("a fast reader", r).await.unwrap());
    }
    // The slow reader was dropped, and its queue with it.
    support::until("the slow reader to be dropped", async || {
        node.hub.socket_count() <= 4
    })
    .await;
    assert_eq!(
        node.hub.socket_count(),
        4,
        "3 fast readers and the publisher remain"
    );
    watcher.abort();
    let peak = *peak.lock().unwrap();
    println!("peak queued bytes on the node: {peak}");
    // Each socket's queue is bounded; five sockets at most ever had bytes queued.
    assert!(peak <= 5 * (MAX_QUEUED + 2048), "peak {peak}");
    support::until("queues to drain", async || node.hub.queued_bytes() == 0).await;
    drop((slow, open));
}

type DisconnectLog = Arc<Mutex<Vec<(String, DisconnectReason)>>>;

fn disconnect_log() -> (
    impl tower::Service<DisconnectEvent, Response = (), Error = Infallible, Future = impl Send>
        + Clone
        + Send
        + Sync
        + 'static,
    DisconnectLog,
) {
    let log: DisconnectLog = Arc::default();
    let l = log.clone();
    let hook = service_fn(move |event: DisconnectEvent| {
        let log = l.clone();
        async move {
            log.lock()
                .unwrap()
                .push((event.socket().connection_id().to_owned(), event.reason()));
            Ok::<_, Infallible>(())
        }
    });
    (hook, log)
}

/// A client with a small receive buffer, subscribed to `room`, that reads nothing, and a
/// publisher that sends 16 KiB messages to `room` until the node's writes to that client
/// wait (under the socket's byte bound, so it is not dropped as a slow reader).
async fn a_client_with_writes_backed_up(node: &Node, room: &str) -> (Client, Client) {
    let mut stuck = Client::connect_with_receive_buffer(&node.url(), node.addr, 4096).await;
    stuck.subscribe(room).await;
    let mut publisher = Client::connect(&node.url()).await;
    let pad = "x".repeat(16 * 1024);
    let mut sent = 0;
    while node.hub.queued_bytes() == 0 {
        assert!(
            sent < 600,
            "the node's writes to the stuck client never waited"
        );
        publisher
            .publish(room, json!({"i": sent, "pad": pad}))
            .await;
        sent += 1;
    }
    println!("the node's writes wait after {sent} messages of 16 KiB");
    (stuck, publisher)
}

/// Waits until the stuck client's socket has given its slot back, while `publisher` stays
/// active (under the idle timeout, so the slot freed is the stuck client's) and is served
/// throughout.
async fn the_stuck_socket_gives_its_slot_back(node: &Node, mut publisher: Client) {
    let publisher = tokio::spawn(async move {
        loop {
            publisher.publish("other", json!("still here")).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    until("the stuck socket to give its slot back", async || {
        node.hub.socket_count() == 1
    })
    .await;
    assert!(
        !publisher.is_finished(),
        "the publisher was served throughout"
    );
    publisher.abort();
}

/// A client that stops reading, lets the node's writes to it back up, then sends its close
/// frame: the socket ends, and its last writes give up after the idle timeout instead of
/// keeping its slot (and what it holds) for as long as the client stays connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_closes_without_reading_gives_its_slot_back() {
    let node = Node::start(
        ThinWsLayer::builder()
            .rate_limit(0, 0)
            .idle_timeout(Duration::from_secs(3))
            .max_queued_bytes(16 << 20)
            .build(),
    )
    .await;
    let (mut stuck, publisher) = a_client_with_writes_backed_up(&node, "r").await;
    stuck.send_close().await;
    the_stuck_socket_gives_its_slot_back(&node, publisher).await;
    drop(stuck);
}

/// A client that stops reading once its queue is full of frames, then sends publishes:
/// their acks wait for room that never comes. The socket must still end (as a slow reader,
/// once the idle timeout has passed) and give its slot back, not wait for the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_whose_acks_wait_for_a_full_queue_gives_its_slot_back() {
    let node = Node::start(
        ThinWsLayer::builder()
            .rate_limit(0, 0)
            .idle_timeout(Duration::from_secs(2))
            .outbound_queue(8)
            .max_queued_bytes(16 << 20)
            .build(),
    )
    .await;
    // What follows stays in the stuck client's queue.
    let (mut stuck, publisher) = a_client_with_writes_backed_up(&node, "big").await;
    // More publishes than the queue holds frames: the last acks wait for room.
    for i in 0..16 {
        stuck
            .send_text(
                json!({"type": "message", "messageID": i, "roomID": "x", "payload": i}).to_string(),
            )
            .await;
    }
    the_stuck_socket_gives_its_slot_back(&node, publisher).await;
    drop(stuck);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_socket_is_dropped_by_the_heartbeat_and_a_live_one_is_kept() {
    let (hook, log) = disconnect_log();
    let node = Node::start(
        ThinWsLayer::builder()
            .ping_interval(Duration::from_millis(100))
            .idle_timeout(Duration::from_millis(400))
            .on_disconnect(hook)
            .build(),
    )
    .await;
    // A live client: it reads, so it answers pings (tungstenite replies while reading).
    let mut live = Client::connect_as(&node.url(), "live").await;
    live.subscribe("r").await;
    let live_reader = tokio::spawn(async move {
        let v = live.delivery().await;
        (live, v)
    });
    // A silent client (as a half-open connection looks to the server): never reads, never
    // answers a ping.
    let silent = Client::connect_as(&node.url(), "silent").await;
    support::until("the silent socket to be dropped", async || {
        !log.lock().unwrap().is_empty()
    })
    .await;
    assert_eq!(
        log.lock().unwrap().clone(),
        [("silent".to_owned(), DisconnectReason::TimedOut)]
    );
    // Well past the timeout, the live socket is still there and working.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(node.hub.socket_count(), 1);
    let mut publisher = Client::connect(&node.url()).await;
    publisher.publish("r", json!("still here")).await;
    let (live, v) = within("the live reader", live_reader).await.unwrap();
    assert_eq!(v["payload"], "still here");
    drop((live, silent));
}

#[tokio::test]
async fn rooms_per_socket_and_sockets_per_node_are_limited() {
    let node = Node::start(
        ThinWsLayer::builder()
            .max_rooms_per_socket(3)
            .max_sockets(2)
            .build(),
    )
    .await;
    let mut c = Client::connect(&node.url()).await;
    for room in ["a", "b", "c"] {
        c.subscribe(room).await;
    }
    let reply = c.request(json!({"type": "subscribe", "roomID": "d"})).await;
    assert_eq!(reply["code"], "limit_exceeded", "{reply}");
    // Re-subscribing to a room it is in is fine; leaving one makes space.
    c.subscribe("a").await;
    c.unsubscribe("b").await;
    c.subscribe("d").await;

    let _second = Client::connect(&node.url()).await;
    let (status, body) = support::http(node.addr, "GET", "/", &support::UPGRADE).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("full"), "{body}");
}

#[tokio::test]
async fn a_socket_over_its_rate_gets_rate_limited_then_closed_if_it_floods() {
    let node = Node::start(
        ThinWsLayer::builder()
            .rate_limit(10, 5)
            .flood_close_after(20)
            .build(),
    )
    .await;
    let mut c = Client::connect(&node.url()).await;
    for i in 0..5 {
        c.send_text(json!({"type": "subscribe", "messageID": i, "roomID": "r"}).to_string())
            .await;
    }
    for i in 0..5 {
        assert_eq!(c.reply_to(&json!(i)).await["type"], "ack");
    }
    c.send_text(json!({"type": "subscribe", "messageID": 99, "roomID": "r"}).to_string())
        .await;
    let reply = c.reply_to(&json!(99)).await;
    assert_eq!(reply["code"], "rate_limited", "{reply}");
    // Keep flooding: closed with 1008.
    for i in 100..130 {
        c.send_text(json!({"type": "subscribe", "messageID": i, "roomID": "r"}).to_string())
            .await;
    }
    assert_eq!(c.closed().await, CloseCode::Policy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_socket_does_not_starve_the_others() {
    let node = Node::start(
        ThinWsLayer::builder()
            .rate_limit(100, 100)
            // Never closed, so it floods for the whole test.
            .flood_close_after(u32::MAX)
            .build(),
    )
    .await;
    let flooder = Client::connect(&node.url()).await;
    let flood = tokio::spawn(async move {
        let mut flooder = flooder;
        let frame = json!({"type": "message", "messageID": 1, "roomID": "flood", "payload": "x".repeat(512)}).to_string();
        let mut sent = 0u64;
        // It never reads its errors either; its queue fills and it is dropped as a slow
        // reader, or it keeps flooding until the test ends.
        while sent < 200_000 {
            if tokio::time::timeout(Duration::from_secs(1), flooder.send_text(frame.clone()))
                .await
                .is_err()
            {
                break;
            }
            sent += 1;
        }
        sent
    });
    let mut a = Client::connect(&node.url()).await;
    let mut b = Client::connect(&node.url()).await;
    b.subscribe("calm").await;
    for i in 0..80 {
        a.publish("calm", json!(i)).await;
        assert_eq!(b.delivery().await["payload"], i);
    }
    flood.abort();
}

#[tokio::test]
async fn pings_count_toward_the_rate_limit_and_a_ping_flood_closes_with_1008() {
    let node = Node::start(
        ThinWsLayer::builder()
            .rate_limit(10, 5)
            .flood_close_after(20)
            .build(),
    )
    .await;
    let mut c = Client::connect(&node.url()).await;
    for _ in 0..200 {
        c.send_message(tokio_tungstenite::tungstenite::Message::Ping(
            bytes::Bytes::from_static(b"p"),
        ))
        .await;
    }
    assert_eq!(c.closed().await, CloseCode::Policy);
}

/// A burst over the rate: every frame the server read gets exactly one reply, in order,
/// then the close frame 1008 arrives intact (no connection reset), run after run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_gets_a_reply_for_every_frame_read_then_a_clean_1008() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    // Refill slow enough that the burst decides: 200 allowed, then 101 refusals in a row.
    let node = Node::start(ThinWsLayer::builder().rate_limit(1, 200).build()).await;
    for run in 0..10 {
        let (mut ws, _) = tokio_tungstenite::connect_async(node.url()).await.unwrap();
        for i in 0..350 {
            let frame = json!({"type": "subscribe", "messageID": i, "roomID": "r"});
            ws.feed(Message::text(frame.to_string())).await.unwrap();
        }
        ws.flush().await.unwrap();
        let (mut acks, mut limited) = (0, 0);
        let close = loop {
            match within("a reply or the close", ws.next()).await {
                Some(Ok(Message::Text(text))) => {
                    let reply: serde_json::Value = serde_json::from_str(&text).unwrap();
                    assert_eq!(
                        reply["messageID"],
                        acks + limited,
                        "run {run}: in order, no gap"
                    );
                    match reply["type"].as_str() {
                        Some("ack") => acks += 1,
                        _ => {
                            assert_eq!(reply["code"], "rate_limited", "run {run}: {reply}");
                            limited += 1;
                        }
                    }
                }
                Some(Ok(Message::Close(frame))) => break frame.map(|f| f.code),
                Some(Ok(_)) => {}
                Some(Err(e)) => panic!("run {run}: {e} after {acks} acks, {limited} limited"),
                None => panic!("run {run}: ended without a close frame"),
            }
        };
        assert_eq!(close, Some(CloseCode::Policy), "run {run}");
        // The burst of 200, then refusals until the 101st in a row (a flood), which is
        // answered too; a token refilled meanwhile (1 per second) adds an ack.
        assert!((200..=202).contains(&acks), "run {run}: {acks} acks");
        assert!(limited >= 101, "run {run}: {limited} refused");
        assert!(
            acks + limited < 350,
            "run {run}: frames after the flood were not read"
        );
    }
}

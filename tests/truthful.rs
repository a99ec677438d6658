//! Every reply tells the truth about a publish: `ack` means Redis accepted it,
//! `unavailable` means it was never sent (nobody receives it), `timeout` means the outcome
//! is unknown. Shown with a real Redis frozen by SIGSTOP and an independent subscriber on
//! its own Redis connection.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use support::{Node, RedisServer};
use thinws::ThinWsLayer;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_gets_timeout_or_unavailable_in_time_and_unavailable_means_unsent() {
    let redis = RedisServer::start().await;
    // The default Redis timeout (2 s): every reply must come within 3 s of its frame.
    let layer = ThinWsLayer::builder()
        .redis_url(redis.url())
        .rate_limit(0, 0)
        .connect()
        .await
        .unwrap();
    let node = Node::start(layer).await;

    // The observer: a plain Redis subscriber on its own connection.
    let mut observer = redis::Client::open(redis.url())
        .unwrap()
        .get_async_pubsub()
        .await
        .unwrap();
    observer.subscribe("thinws:room:{r}").await.unwrap();
    let seen = Arc::new(Mutex::new(BTreeSet::new()));
    let watch = tokio::spawn({
        let seen = seen.clone();
        async move {
            let mut messages = observer.on_message();
            while let Some(message) = messages.next().await {
                let frame: Value =
                    serde_json::from_str(&message.get_payload::<String>().unwrap()).unwrap();
                seen.lock()
                    .unwrap()
                    .insert(frame["payload"].as_u64().unwrap());
            }
        }
    });

    let (ws, _) = tokio_tungstenite::connect_async(node.url()).await.unwrap();
    let (mut tx, mut rx) = ws.split();
    let sent_at: Arc<Mutex<BTreeMap<u64, Instant>>> = Arc::default();
    let sender = tokio::spawn({
        let sent_at = sent_at.clone();
        async move {
            // 50 ms apart for 6 s; Redis is frozen from 1 s to 4 s.
            for seq in 0..120u64 {
                let frame =
                    json!({"type": "message", "messageID": seq, "roomID": "r", "payload": seq});
                sent_at.lock().unwrap().insert(seq, Instant::now());
                tx.send(Message::text(frame.to_string())).await.unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            tx
        }
    });
    // Replies are read as they come, from the start.
    let collector = tokio::spawn({
        let sent_at = sent_at.clone();
        async move {
            let mut replies: BTreeMap<u64, (String, Duration)> = BTreeMap::new();
            while replies.len() < 120 {
                let Some(Ok(Message::Text(text))) = rx.next().await else {
                    continue;
                };
                let reply: Value = serde_json::from_str(&text).unwrap();
                let seq = reply["messageID"].as_u64().unwrap();
                let took = sent_at.lock().unwrap()[&seq].elapsed();
                let kind = match reply["type"].as_str().unwrap() {
                    "ack" => "ack".to_owned(),
                    _ => reply["code"].as_str().unwrap().to_owned(),
                };
                replies.insert(seq, (kind, took));
            }
            replies
        }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    redis.freeze();
    tokio::time::sleep(Duration::from_secs(3)).await;
    redis.thaw();

    let replies = tokio::time::timeout(Duration::from_secs(20), collector)
        .await
        .expect("every frame gets its reply")
        .unwrap();
    // A last message on the same socket (the same publishing lane, run in order by Redis):
    // once the observer has it, it has everything Redis accepted before it.
    const BARRIER: u64 = 1_000_000;
    let mut tx = sender.await.unwrap();
    let barrier =
        json!({"type": "message", "messageID": "barrier", "roomID": "r", "payload": BARRIER});
    tx.send(Message::text(barrier.to_string())).await.unwrap();
    support::until("the barrier to reach the observer", async || {
        seen.lock().unwrap().contains(&BARRIER)
    })
    .await;
    watch.abort();
    let mut seen = seen.lock().unwrap().clone();
    seen.remove(&BARRIER);

    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    let mut slowest = Duration::ZERO;
    for (seq, (kind, took)) in &replies {
        *counts.entry(kind.as_str()).or_default() += 1;
        slowest = slowest.max(*took);
        match kind.as_str() {
            "ack" => assert!(seen.contains(seq), "{seq} was acked but never published"),
            "unavailable" => assert!(
                !seen.contains(seq),
                "{seq} got unavailable but was published"
            ),
            "timeout" => {}
            other => panic!("{seq}: unexpected reply {other}"),
        }
    }
    println!(
        "replies {counts:?}; slowest {slowest:?}; the observer saw {}",
        seen.len()
    );
    for (seq, (kind, took)) in &replies {
        if *took > Duration::from_millis(1500) || kind != "ack" {
            println!("  {seq}: {kind} after {took:?}");
        }
    }
    assert!(
        slowest <= Duration::from_secs(3),
        "a reply took {slowest:?}"
    );
    assert!(counts.get("ack").copied().unwrap_or(0) >= 40, "{counts:?}");
    assert!(
        counts.get("timeout").copied().unwrap_or(0)
            + counts.get("unavailable").copied().unwrap_or(0)
            > 0,
        "the freeze was felt: {counts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_publish_after_a_redis_restart_is_not_refused_once_health_is_ready() {
    let mut redis = RedisServer::start().await;
    let layer = ThinWsLayer::builder()
        .redis_url(redis.url())
        .redis_timeout(Duration::from_millis(500))
        .connect()
        .await
        .unwrap();
    let hub = layer.hub();
    let node = Node::start(layer).await;
    let mut c = support::Client::connect(&node.url()).await;
    c.publish("r", json!("before")).await;
    for round in 0..3 {
        redis.restart().await;
        support::until("health after the restart", async || {
            hub.health().await.is_ready()
        })
        .await;
        let reply = c
            .request(json!({"type": "message", "roomID": "r", "payload": round}))
            .await;
        assert_eq!(reply["type"], "ack", "round {round}: {reply}");
    }
}

/// A node shutting down answers every frame it read before its close (1001): publishes
/// in flight to a frozen Redis get their ack once it thaws, then the close comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_shutting_down_answers_the_publishes_in_flight_before_closing() {
    use thinws::hooks::{MessageEvent, MessageVerdict};
    let redis = RedisServer::start().await;
    let (entered_tx, mut entered) = tokio::sync::mpsc::unbounded_channel();
    let layer = ThinWsLayer::builder()
        .redis_url(redis.url())
        .on_message(tower::service_fn(move |_: MessageEvent| {
            let _ = entered_tx.send(());
            async { Ok::<_, std::convert::Infallible>(MessageVerdict::Allow) }
        }))
        .build();
    let node = Node::start(layer).await;
    let mut c = support::Client::connect(&node.url()).await;
    c.subscribe("r").await;
    redis.freeze();
    for id in 1..=4 {
        let frame = json!({"type": "message", "messageID": id, "roomID": "r", "payload": id});
        c.send_text(frame.to_string()).await;
    }
    // The fourth message is in its hook: the three before it are queued at the broker.
    for _ in 0..4 {
        support::within("a message hook", entered.recv())
            .await
            .unwrap();
    }
    let hub = node.hub.clone();
    let shutdown = tokio::spawn(async move { hub.shutdown(Duration::from_secs(10)).await });
    support::until("the node to refuse new sockets", async || {
        tokio_tungstenite::connect_async(node.url()).await.is_err()
    })
    .await;
    redis.thaw();
    let (frames, code) = c.frames_until_closed().await;
    let acked: Vec<u64> = frames
        .iter()
        .filter(|v| v["type"] == "ack")
        .filter_map(|v| v["messageID"].as_u64())
        .collect();
    assert_eq!(acked, [1, 2, 3, 4], "{frames:?}");
    assert_eq!(
        code,
        tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Away
    );
    assert_eq!(shutdown.await.unwrap(), 0);
}

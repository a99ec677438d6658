//! Nothing dropped silently: when Redis cuts a node's pub/sub connection (a subscriber that
//! lags past `client-output-buffer-limit pubsub`), the node logs and counts it, and every
//! socket in a room that may have missed messages gets a `gap`, plain rooms included.

mod support;

#[path = "support/binary.rs"]
mod binary;

use binary::{metric, Server};
use serde_json::json;
use support::{http, within, Client, RedisServer};

/// Messages of 60 KB published while the node is stopped: 20 MB, more than the kernel's
/// socket buffers hold, so that Redis's output buffer for the node overflows.
const MESSAGES: usize = 330;

/// The reproduction: a small pub/sub output buffer limit, and node B stopped while
/// 20 MB are published into a room it holds: Redis cuts B's pub/sub connection, and what
/// it had buffered for B is gone, including messages of another room ("quiet"). Once B is
/// back, its socket in "quiet" (a room without history: nothing can say what was missed)
/// gets a `gap`, while a socket on node A gets every message and no gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_connection_that_redis_cut_gives_its_rooms_a_gap() {
    let redis = RedisServer::start().await;
    let mut admin = redis.client().await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("client-output-buffer-limit")
        .arg("pubsub 256kb 128kb 1")
        .query_async(&mut admin)
        .await
        .unwrap();
    let a = Server::start(&["--redis-url", &redis.url(), "--no-demo"]).await;
    let b = Server::start(&["--redis-url", &redis.url(), "--no-demo"]).await;
    let mut on_a = Client::connect_as(&a.url(), "on-a").await;
    let mut on_b = Client::connect_as(&b.url(), "on-b").await;
    on_a.subscribe("quiet").await;
    on_b.subscribe("quiet").await;
    // Holds the flooded room on B (it will be dropped as a slow reader; never read).
    let mut flooded = Client::connect_as(&b.url(), "flooded").await;
    flooded.subscribe("flood").await;

    let publish = |room: &'static str, payload: serde_json::Value| {
        let frame =
            json!({"type": "message", "roomID": room, "connectionID": "p", "payload": payload});
        redis::cmd("PUBLISH")
            .arg(format!("thinws:room:{{{room}}}"))
            .arg(frame.to_string())
            .clone()
    };
    b.signal("-STOP");
    let fill = "x".repeat(60_000);
    for n in 0..MESSAGES {
        let _: i64 = publish("flood", json!({"n": n, "fill": fill}))
            .query_async(&mut admin)
            .await
            .unwrap();
    }
    for n in 0..10 {
        let _: i64 = publish("quiet", json!(n))
            .query_async(&mut admin)
            .await
            .unwrap();
    }
    // Redis cuts B's connection past the hard limit: only A's pub/sub client is left.
    support::until("Redis to cut B's pub/sub connection", async || {
        let clients: String = redis::cmd("CLIENT")
            .arg("LIST")
            .arg("TYPE")
            .arg("pubsub")
            .query_async(&mut admin)
            .await
            .unwrap();
        clients.lines().count() == 1
    })
    .await;
    b.signal("-CONT");

    let received_before_gap = within("a gap on the node that was cut", async {
        let mut received = 0;
        loop {
            let frame = on_b.recv().await;
            match frame["type"].as_str() {
                Some("gap") => {
                    assert_eq!(frame["roomID"], "quiet", "{frame}");
                    assert!(frame.get("offset").is_none(), "{frame}");
                    return received;
                }
                Some("message") => received += 1,
                _ => panic!("unexpected {frame}"),
            }
        }
    })
    .await;
    assert!(
        received_before_gap < 10,
        "nothing was lost: the test proves nothing"
    );
    for n in 0..10 {
        assert_eq!(on_a.delivery().await["payload"], n);
    }

    let (_, metrics) = http(b.addr, "GET", "/metrics", &[]).await;
    assert_eq!(
        metric(&metrics, "thinws_redis_pubsub_cut_total"),
        1.0,
        "{metrics}"
    );
    assert!(metric(&metrics, "thinws_gaps_total") >= 1.0, "{metrics}");

    // The room goes on: live messages reach both nodes again.
    on_a.publish("quiet", json!("after")).await;
    assert_eq!(on_b.delivery().await["payload"], "after");
    assert_eq!(on_a.delivery().await["payload"], "after");
    let (_, metrics) = http(a.addr, "GET", "/metrics", &[]).await;
    assert_eq!(metric(&metrics, "thinws_gaps_total"), 0.0, "{metrics}");
    drop(flooded);
}

/// Redis loses its data (identities' records and histories with it), then the client's
/// node goes away: the client reconnects to another node, whose `connect` ack lists none of
/// its rooms. It subscribes to them again on its own and tells the application with a gap
/// for each (no room it believed it was in vanishes silently), and messages flow again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_whose_rooms_redis_lost_subscribes_again_and_is_told() {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;
    use thinws::client::{Gap, ThinWsClient};
    use thinws::settings::{History, RoomSettings};

    let mut redis = RedisServer::start().await;
    let layer = || {
        thinws::ThinWsLayer::builder()
            .redis_url(redis.url())
            .room_settings(
                "h:*",
                RoomSettings::with_history(History::new(100, Duration::from_secs(60))),
            )
            .build()
    };
    let a = support::Node::start(layer()).await;
    let b = support::Node::start(layer()).await;
    let gaps: Arc<Mutex<Vec<Gap>>> = Arc::default();
    let (client, mut messages) = ThinWsClient::builder(a.url(), "zed")
        .fallback_urls([b.url()])
        .max_backoff(Duration::from_millis(200))
        .on_gap({
            let gaps = gaps.clone();
            move |gap| gaps.lock().unwrap().push(gap)
        })
        .connect()
        .await
        .unwrap();
    client.subscribe("p").await.unwrap();
    client.subscribe("h:x").await.unwrap();
    let mut sender = Client::connect_as(&b.url(), "sender").await;
    sender.publish("h:x", json!(1)).await;
    assert_eq!(next_delivery(&mut messages).await.payload, json!(1));

    redis.restart().await;
    support::until("the nodes to be back on Redis", async || {
        a.hub.health().await.is_ready() && b.hub.health().await.is_ready()
    })
    .await;
    a.hub.shutdown(Duration::from_secs(5)).await;
    // Back in both rooms, on node B, though B's `connect` ack listed neither.
    support::members(&b.hub, "p", 1).await;
    support::members(&b.hub, "h:x", 1).await;
    // Told for each room (by node A when its pub/sub connection came back on an empty
    // Redis, and again when the client subscribed again on B).
    let told: std::collections::BTreeSet<(String, bool)> = gaps
        .lock()
        .unwrap()
        .iter()
        .map(|gap| (gap.room.clone(), gap.offset.is_some()))
        .collect();
    assert_eq!(
        told.into_iter().collect::<Vec<_>>(),
        [("h:x".to_owned(), true), ("p".to_owned(), false)]
    );
    let mut sender = Client::connect_as(&b.url(), "sender2").await;
    sender.publish("p", json!("plain again")).await;
    sender.publish("h:x", json!("history again")).await;
    assert_eq!(
        next_delivery(&mut messages).await.payload,
        json!("plain again")
    );
    assert_eq!(
        next_delivery(&mut messages).await.payload,
        json!("history again")
    );
}

async fn next_delivery(messages: &mut thinws::client::Messages) -> thinws::client::Delivery {
    within("a delivery", futures_util::StreamExt::next(messages))
        .await
        .expect("the stream goes on")
}

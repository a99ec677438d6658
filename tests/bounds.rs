//! What one socket can make the node hold: replies and catch-up count toward the socket's
//! byte bound, `history` replies are paged within a byte budget, and recovery recovers no
//! more than the bound (the rest is a gap the client can page back through).

mod support;

#[path = "support/binary.rs"]
mod binary;

use std::time::{Duration, Instant};

use binary::{metric, rss_kib, Server};
use futures_util::SinkExt;
use serde_json::json;
use support::{http, Client, Node};
use thinws::client::ThinWsClient;
use thinws::settings::History;
use thinws::ThinWsLayer;
use tokio_tungstenite::tungstenite::Message;

/// A payload of about 60 KB (a delivered frame stays under the 64 KiB frame limit).
fn big(n: usize) -> serde_json::Value {
    json!({"n": n, "fill": "x".repeat(60_000)})
}

/// The issue's probe: a room of 50 messages of 60 KB (a 3 MB history), and a socket that
/// never reads asking for it 20 times a second for 10 s. It is closed as a slow reader, and
/// the node's RSS grows by less than 20 MB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_that_asks_for_histories_and_never_reads_is_closed() {
    let server = Server::start(&["--history-size", "50", "--no-demo"]).await;
    let mut filler = Client::connect_as(&server.url(), "filler").await;
    for n in 0..50 {
        filler.publish("big", big(n)).await;
    }
    let before = rss_kib(server.child.id());

    let (ws, _) = tokio_tungstenite::connect_async(server.url())
        .await
        .unwrap();
    // Only the sending half is used: nothing is ever read.
    let (mut sink, _never_read) = futures_util::StreamExt::split(ws);
    let mut peak = before;
    let started = Instant::now();
    let mut sent = 0;
    while started.elapsed() < Duration::from_secs(10) {
        let frame = json!({"type": "history", "messageID": sent, "roomID": "big"});
        if sink.send(Message::text(frame.to_string())).await.is_err() {
            break;
        }
        sent += 1;
        peak = peak.max(rss_kib(server.child.id()));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, metrics) = http(server.addr, "GET", "/metrics", &[]).await;
    assert!(
        metric(&metrics, "thinws_slow_reader_drops_total") >= 1.0,
        "the socket was not dropped after {sent} requests:\n{metrics}"
    );
    assert_eq!(
        metric(&metrics, "thinws_sockets"),
        1.0,
        "only the filler is left"
    );
    let grown = peak.saturating_sub(before);
    assert!(grown < 20 * 1024, "RSS grew by {grown} KiB");
}

async fn history_node() -> Node {
    Node::start(
        ThinWsLayer::builder()
            .history(History::new(50, Duration::from_secs(60)))
            .rate_limit(0, 0)
            .build(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_history_comes_in_pages_within_the_byte_budget() {
    let node = history_node().await;
    let mut client = Client::connect_as(&node.url(), "a").await;
    for n in 0..50 {
        client.publish("big", big(n)).await;
    }
    // The default bound is 1 MiB: a reply carries at most 256 KiB of messages.
    let mut offsets = Vec::new();
    let mut before = None;
    loop {
        let mut frame = json!({"type": "history", "roomID": "big"});
        if let Some(before) = before {
            frame["before"] = json!(before);
        }
        let reply = client.request(frame).await;
        assert_eq!(reply["type"], "ack", "{reply}");
        assert!(
            reply.to_string().len() <= 256 * 1024 + 512,
            "a reply over its budget"
        );
        assert_eq!(reply["offset"], 50, "the room's top");
        let page = support::message_offsets(&reply);
        assert!(!page.is_empty());
        offsets.splice(0..0, page.iter().copied());
        if reply["more"] != true {
            break;
        }
        before = Some(page[0]);
    }
    assert_eq!(offsets, (1..=50).collect::<Vec<_>>());

    // `limit` counts from the newest before `before`.
    let reply = client
        .request(json!({"type": "history", "roomID": "big", "limit": 2, "before": 10}))
        .await;
    let page: Vec<_> = reply["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["offset"].clone())
        .collect();
    assert_eq!(page, [json!(8), json!(9)]);
    assert!(reply.get("more").is_none(), "{reply}");

    // The Rust client pages on its own.
    let (rust, _) = ThinWsClient::connect(node.url(), "b").await.unwrap();
    let history = rust.history("big", None).await.unwrap();
    let got: Vec<_> = history
        .messages
        .iter()
        .map(|m| m.payload["n"].clone())
        .collect();
    assert_eq!(got, (0..50).map(|n| json!(n)).collect::<Vec<_>>());
    let last = rust.history("big", Some(7)).await.unwrap();
    assert_eq!(last.messages.len(), 7);
    assert_eq!(last.messages[0].payload["n"], 43);
}

/// On Redis, a page is read from its newest end in growing chunks and cut at the byte
/// budget: with a 16 KiB budget (a 64 KiB bound) and messages of about 1 KB, each page ends
/// in the script's second chunk. Paging back returns every message once, in order, each
/// page within its budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_pages_from_redis_are_cut_at_the_byte_budget() {
    let redis = support::RedisServer::start().await;
    let layer = ThinWsLayer::builder()
        .redis_url(redis.url())
        .history(History::new(1000, Duration::from_secs(60)))
        .max_queued_bytes(64 * 1024)
        .rate_limit(0, 0)
        .build();
    let node = Node::start(layer).await;
    let mut client = Client::connect_as(&node.url(), "a").await;
    for n in 0..100 {
        client
            .publish("kb", json!({"n": n, "fill": "x".repeat(1000)}))
            .await;
    }
    let (mut offsets, mut before, mut pages) = (Vec::new(), None, 0);
    loop {
        let mut frame = json!({"type": "history", "roomID": "kb"});
        if let Some(before) = before {
            frame["before"] = json!(before);
        }
        let reply = client.request(frame).await;
        assert_eq!(reply["type"], "ack", "{reply}");
        assert!(
            reply.to_string().len() <= 16 * 1024 + 512,
            "over its budget"
        );
        let page = support::message_offsets(&reply);
        offsets.splice(0..0, page.iter().copied());
        pages += 1;
        if reply["more"] != true {
            break;
        }
        assert!(
            page.len() > 8,
            "a full page ends past the first chunk: {page:?}"
        );
        before = Some(page[0]);
    }
    assert_eq!(offsets, (1..=100).collect::<Vec<_>>());
    assert!(pages >= 6, "{pages} pages");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_beyond_the_bound_is_a_gap_not_a_flood() {
    let node = Node::start(
        ThinWsLayer::builder()
            .history(History::new(50, Duration::from_secs(60)))
            .max_queued_bytes(400 * 1024)
            .rate_limit(0, 0)
            .build(),
    )
    .await;
    let mut publisher = Client::connect_as(&node.url(), "p").await;
    publisher.publish("big", big(0)).await;
    let mut reader = Client::connect_as(&node.url(), "r").await;
    let reply = reader
        .request(json!({"type": "subscribe", "roomID": "big"}))
        .await;
    let since = json!({"offset": reply["offset"], "epoch": reply["epoch"]});
    reader
        .request(json!({"type": "unsubscribe", "roomID": "big"}))
        .await;

    // 4 missed messages (240 KB) fit in the 400 KiB bound: recovered.
    for n in 1..=4 {
        publisher.publish("big", big(n)).await;
    }
    let reply = reader
        .request(json!({"type": "subscribe", "roomID": "big", "since": since}))
        .await;
    assert_eq!(reply["recovered"], true, "{reply}");
    for n in 1..=4 {
        assert_eq!(reader.delivery().await["payload"]["n"], n);
    }
    reader
        .request(json!({"type": "unsubscribe", "roomID": "big"}))
        .await;

    // 10 missed messages (600 KB) do not: not recovered, and the socket goes on.
    for n in 5..=14 {
        publisher.publish("big", big(n)).await;
    }
    let reply = reader
        .request(json!({"type": "subscribe", "roomID": "big", "since": since}))
        .await;
    assert_eq!(reply["recovered"], false, "{reply}");
    assert_eq!(reply["offset"], 15);
    publisher.publish("big", json!("live")).await;
    assert_eq!(reader.delivery().await["payload"], "live");
}

/// At the socket limit, a burst of upgrades: exactly the free slots get 101 and stay open,
/// and every other one gets 503 (never a 101 followed by a close).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_upgrades_at_the_limit_gets_101_or_503_never_both() {
    let server = Server::start(&["--max-sockets", "20", "--no-demo"]).await;
    let url = server.url();
    let attempts: Vec<_> = (0..50)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { tokio_tungstenite::connect_async(url).await })
        })
        .collect();
    let mut open = Vec::new();
    let mut refused = 0;
    for attempt in attempts {
        match attempt.await.unwrap() {
            Ok((ws, _)) => open.push(Client::from_stream(ws)),
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), 503);
                refused += 1;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!((open.len(), refused), (20, 30));
    // Every socket that got 101 works.
    for (n, client) in open.iter_mut().enumerate() {
        client.subscribe(&format!("room-{n}")).await;
    }
}

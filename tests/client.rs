//! The Rust client against a real server: acks and errors, deliveries, reconnection after
//! a server restart and after the server closes the socket, queueing while disconnected.

mod support;

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::json;
use support::{within, Client, Node, RedisServer};
use thinws::client::{ClientError, Delivery, Gap, Messages, ThinWsClient};
use thinws::hooks::{SubscribeEvent, Verdict};
use thinws::protocol::ErrorCode;
use thinws::settings::{History, RoomSettings};
use thinws::{ThinWsBuilder, ThinWsLayer};
use tower::service_fn;

async fn next(messages: &mut Messages) -> Delivery {
    within("a delivery", messages.next())
        .await
        .expect("stream ended")
}

/// A layer on `redis` with history in the rooms `h:*` (100 messages, 60 s), and whatever
/// `tune` sets besides.
fn history_layer(
    redis: &RedisServer,
    tune: impl FnOnce(ThinWsBuilder) -> ThinWsBuilder,
) -> ThinWsLayer {
    let history = History::new(100, Duration::from_secs(60));
    tune(ThinWsLayer::builder().redis_url(redis.url()))
        .room_settings("h:*", RoomSettings::with_history(history))
        .build()
}

/// A client of `url` as `identity` that redials within 200 ms, and the gaps it was told.
async fn client_telling_gaps(url: String, identity: &str) -> (ThinWsClient, Messages, Gaps) {
    let gaps = Gaps::default();
    let (client, messages) = ThinWsClient::builder(url, identity)
        .max_backoff(Duration::from_millis(200))
        .on_gap({
            let gaps = gaps.clone();
            move |gap| gaps.lock().unwrap().push(gap)
        })
        .connect()
        .await
        .unwrap();
    (client, messages, gaps)
}

type Gaps = Arc<std::sync::Mutex<Vec<Gap>>>;

#[tokio::test]
async fn acks_errors_and_deliveries_map_to_types() {
    let layer = ThinWsLayer::builder()
        .on_subscribe(service_fn(|e: SubscribeEvent| async move {
            Ok::<_, Infallible>(if e.room() == "secret" {
                Verdict::refuse("no entry")
            } else {
                Verdict::Allow
            })
        }))
        .build();
    let node = Node::start(layer).await;
    let (client, mut messages) = ThinWsClient::connect(node.url(), "alice").await.unwrap();
    client.subscribe("lobby").await.unwrap();
    client.send("lobby", &json!({"text": "hi"})).await.unwrap();
    let got = next(&mut messages).await;
    assert_eq!(got.room, "lobby");
    assert_eq!(got.sender.as_deref(), Some("alice"));
    #[derive(serde::Deserialize, PartialEq, Debug)]
    struct Chat {
        text: String,
    }
    assert_eq!(
        got.payload_as::<Chat>().unwrap(),
        Chat { text: "hi".into() }
    );

    let err = client.subscribe("secret").await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Server { code, message } if *code == ErrorCode::Forbidden && message == "no entry"),
        "{err:?}"
    );
    let err = client.subscribe("x".repeat(300)).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::TooLarge));

    // Another client's message arrives on the stream too.
    let mut other = Client::connect(&node.url()).await;
    other.publish("lobby", json!(2)).await;
    assert_eq!(next(&mut messages).await.payload, json!(2));

    client.clone().close().await;
    assert!(within("the stream to end", messages.next()).await.is_none());
    assert!(matches!(
        client.subscribe("late").await,
        Err(ClientError::Closed)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_reconnects_after_a_server_restart_and_gets_its_rooms_back() {
    let redis = RedisServer::start().await;
    let node = Node::redis(&redis).await;
    let addr = node.addr;
    let (client, mut messages) = ThinWsClient::builder(node.url(), "bob")
        .max_backoff(Duration::from_millis(200))
        .connect()
        .await
        .unwrap();
    client.subscribe("r").await.unwrap();

    // The server goes away (its sockets are closed with 1001), then comes back.
    node.hub.shutdown(Duration::from_secs(5)).await;
    drop(node);
    support::until("the client to notice", async || !client.is_connected()).await;
    // A request made while disconnected waits in the queue.
    let queued = tokio::spawn({
        let client = client.clone();
        async move { client.send("r", &json!("queued while down")).await }
    });
    let node = Node::start_on(addr, ThinWsLayer::new(redis.url())).await;

    within("the queued request", queued).await.unwrap().unwrap();
    assert!(client.is_connected());
    assert_eq!(
        next(&mut messages).await.payload,
        json!("queued while down")
    );
    // Its room was rejoined by `connect` on reconnection: other senders reach it.
    let mut publisher = Client::connect(&node.url()).await;
    publisher.publish("r", json!("after restart")).await;
    assert_eq!(next(&mut messages).await.payload, json!("after restart"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_reconnects_after_the_server_closes_the_socket() {
    let node = Node::start(ThinWsLayer::builder().max_frame_size(1024).build()).await;
    let gaps = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = gaps.clone();
    let (client, mut messages) = ThinWsClient::builder(node.url(), "carol")
        .max_backoff(Duration::from_millis(200))
        .on_gap(move |gap| seen.lock().unwrap().push(gap))
        .connect()
        .await
        .unwrap();
    client.subscribe("r").await.unwrap();
    // Over the frame limit: the server closes the socket with 1009.
    let err = client.send("r", &"z".repeat(4096)).await.unwrap_err();
    assert!(matches!(err, ClientError::Disconnected), "{err:?}");
    // The client is back, with its room (in-memory identities live in the node). The room
    // keeps no history: what was published meanwhile is gone, and the client says so.
    client.send("r", &json!("back")).await.unwrap();
    assert_eq!(next(&mut messages).await.payload, json!("back"));
    let gaps = gaps.lock().unwrap();
    assert_eq!(gaps.len(), 1, "{gaps:?}");
    assert_eq!((gaps[0].room.as_str(), gaps[0].offset), ("r", None));
}

/// Positions that make the `connect` frame larger than the server takes: the server closes
/// that connect with 1009, and the client then connects without them, instead of sending
/// the same frame for ever. A room that got a message meanwhile is told a gap; the quiet
/// ones, whose positions the ack matches, are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn positions_too_large_for_a_connect_are_given_up_with_a_gap() {
    let redis = RedisServer::start().await;
    let layer = || history_layer(&redis, |builder| builder.max_frame_size(1024));
    let node = Node::start(layer()).await;
    let other = Node::start(layer()).await;
    let addr = node.addr;
    let (client, mut messages, gaps) = client_telling_gaps(node.url(), "ivy").await;
    // Six rooms whose positions together take about 1.3 KiB.
    let rooms: Vec<String> = (0..6)
        .map(|i| format!("h:{i}{}", "x".repeat(180)))
        .collect();
    for room in &rooms {
        client.subscribe(room).await.unwrap();
        client.send(room, &json!("first")).await.unwrap();
        assert_eq!(next(&mut messages).await.offset, Some(1));
    }
    // The client's node goes away; one room gets a message meanwhile.
    node.hub.shutdown(Duration::from_secs(5)).await;
    drop(node);
    support::until("the client to notice", async || !client.is_connected()).await;
    let mut publisher = Client::connect(&other.url()).await;
    publisher.publish(&rooms[0], json!("missed")).await;
    let _node = Node::start_on(addr, layer()).await;
    within(
        "the client to reconnect",
        client.send(&rooms[1], &json!("back")),
    )
    .await
    .unwrap();
    let got = next(&mut messages).await;
    assert_eq!((got.offset, got.payload), (Some(2), json!("back")));
    let gaps = gaps.lock().unwrap();
    let told: Vec<_> = gaps.iter().map(|gap| (&gap.room, gap.offset)).collect();
    assert_eq!(told, [(&rooms[0], Some(2))]);
}

/// A TCP relay to `target` whose connections can be silenced: from `silence()` on, the
/// connections open then pass nothing either way and stay open, as a connection whose
/// peer vanished without a FIN (a NAT that forgot it). Later connections pass.
struct Relay {
    addr: std::net::SocketAddr,
    opened: Arc<AtomicU64>,
    silenced_below: Arc<AtomicU64>,
}

impl Relay {
    async fn start(target: std::net::SocketAddr) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (opened, silenced_below) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (count, silenced) = (opened.clone(), silenced_below.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let number = count.fetch_add(1, Ordering::SeqCst);
                let server = tokio::net::TcpStream::connect(target).await.unwrap();
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                for (mut from, mut to) in [(client_read, server_write), (server_read, client_write)]
                {
                    let silenced = silenced.clone();
                    tokio::spawn(async move {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut buf = vec![0; 16 * 1024];
                        while let Ok(n @ 1..) = from.read(&mut buf).await {
                            if number < silenced.load(Ordering::SeqCst) {
                                // Silenced: both ends stay open, nothing more passes.
                                std::future::pending::<()>().await;
                            }
                            if to.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    });
                }
            }
        });
        Relay {
            addr,
            opened,
            silenced_below,
        }
    }

    fn url(&self) -> String {
        format!("ws://{}/", self.addr)
    }

    /// Silences every connection opened so far.
    fn silence(&self) {
        let opened = self.opened.load(Ordering::SeqCst);
        self.silenced_below.store(opened, Ordering::SeqCst);
    }
}

/// A connection that goes silent without closing is pinged after `keepalive`, given up
/// when the ping gets no answer, and replaced: the client is back in its room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_gone_silent_is_noticed_and_replaced() {
    let node = Node::start(ThinWsLayer::builder().build()).await;
    let relay = Relay::start(node.addr).await;
    let (client, mut messages) = ThinWsClient::builder(relay.url(), "dora")
        .keepalive(Duration::from_millis(300))
        .max_backoff(Duration::from_millis(200))
        .connect()
        .await
        .unwrap();
    client.subscribe("r").await.unwrap();
    relay.silence();
    // Nothing passes now, and nothing closes: the client must find out by itself.
    support::until("the client to reconnect", async || {
        relay.opened.load(Ordering::SeqCst) >= 2 && client.is_connected()
    })
    .await;
    let mut publisher = Client::connect(&node.url()).await;
    publisher.publish("r", json!("after the silence")).await;
    assert_eq!(
        next(&mut messages).await.payload,
        json!("after the silence")
    );
}

/// A server joins each room as its `connect` rejoins it, so what a room carries (or a
/// `gap`) can arrive before the `connect` ack: it is delivered after it, not dropped, up to
/// 4,096 frames; a room whose frames come past that bound is told a gap instead. A
/// scripted server sends exactly that.
#[tokio::test]
async fn what_arrives_before_the_connect_ack_is_delivered() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/", listener.local_addr().unwrap());
    let gaps = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = gaps.clone();
    tokio::spawn(async move {
        use futures_util::SinkExt;
        use tokio_tungstenite::tungstenite::Message;
        let (tcp, _) = listener.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
        let connect = ws.next().await.unwrap().unwrap();
        assert!(connect.to_text().unwrap().contains(r#""type":"connect""#));
        let message = |room: &str, payload: serde_json::Value| json!({"type": "message", "roomID": room, "connectionID": "x", "payload": payload});
        let mut frames = vec![
            message("a", json!("early")),
            json!({"type": "gap", "roomID": "b"}),
        ];
        // Up to the bound (4,096 frames in all), then three past it in room "c".
        frames.extend((0..4094).map(|n| message("a", json!(n))));
        frames.extend((0..3).map(|n| message("c", json!(n))));
        frames.push(json!({"type": "ack", "messageID": 0}));
        frames.push(message("a", json!("late")));
        for frame in frames {
            ws.feed(Message::text(frame.to_string())).await.unwrap();
        }
        ws.flush().await.unwrap();
        std::future::pending::<()>().await;
    });
    let (_client, mut messages) = ThinWsClient::builder(url, "erin")
        .on_gap(move |gap| seen.lock().unwrap().push(gap.room))
        .connect()
        .await
        .unwrap();
    assert_eq!(next(&mut messages).await.payload, json!("early"));
    for n in 0..4094 {
        assert_eq!(next(&mut messages).await.payload, json!(n));
    }
    assert_eq!(next(&mut messages).await.payload, json!("late"));
    let mut gaps = gaps.lock().unwrap().clone();
    gaps.sort();
    assert_eq!(gaps, ["b", "c"]);
}

#[tokio::test]
async fn requests_beyond_the_queue_bound_fail_fast_while_disconnected() {
    let node = Node::start(ThinWsLayer::in_memory()).await;
    let (client, _messages) = ThinWsClient::builder(node.url(), "dan")
        .max_queued(1)
        .request_timeout(Duration::from_millis(500))
        .max_backoff(Duration::from_secs(60))
        .connect()
        .await
        .unwrap();
    client.subscribe("r").await.unwrap();
    node.hub.shutdown(Duration::from_secs(5)).await;
    drop(node);
    // Requests keep coming while the server is gone: one fits in the queue, the others
    // fail at once; none succeeds.
    let mut calls = Vec::new();
    for _ in 0..20 {
        let client = client.clone();
        calls.push(tokio::spawn(async move { client.subscribe("b").await }));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut queue_full = 0;
    for call in calls {
        match within("a request", call).await.unwrap() {
            Err(ClientError::QueueFull) => queue_full += 1,
            Err(ClientError::Timeout | ClientError::Disconnected) => {}
            other => panic!("{other:?}"),
        }
    }
    assert!(queue_full >= 18, "{queue_full}");
}

#[tokio::test]
async fn the_first_connection_fails_clearly() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let err = ThinWsClient::connect(format!("ws://127.0.0.1:{port}/"), "eve")
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Connect(_)), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_goes_with_every_connect_and_a_provider_is_asked_each_time() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use thinws::hooks::{ConnectEvent, ConnectVerdict};
    // The node takes the identity from the token (what an authenticating hook does).
    let layer = || {
        ThinWsLayer::builder()
            .on_connect(service_fn(|e: ConnectEvent| async move {
                Ok::<_, Infallible>(match e.token() {
                    Some(token) => ConnectVerdict::Assign(token.to_owned()),
                    None => ConnectVerdict::refuse("a token is required"),
                })
            }))
            .build()
    };
    let node = Node::start(layer()).await;
    let refused = ThinWsClient::connect(node.url(), "x").await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::Forbidden), "{refused:?}");

    let (client, mut messages) = ThinWsClient::builder(node.url(), "x")
        .token("fixed")
        .connect()
        .await
        .unwrap();
    client.subscribe("r").await.unwrap();
    client.send("r", &json!(1)).await.unwrap();
    assert_eq!(next(&mut messages).await.sender.as_deref(), Some("fixed"));

    let asked = Arc::new(AtomicUsize::new(0));
    let (client, mut messages) = ThinWsClient::builder(node.url(), "x")
        .max_backoff(Duration::from_millis(200))
        .token_provider({
            let asked = asked.clone();
            move || {
                let n = asked.fetch_add(1, Ordering::SeqCst) + 1;
                Box::pin(async move { Ok(format!("fresh-{n}")) })
            }
        })
        .connect()
        .await
        .unwrap();
    client.subscribe("r").await.unwrap();
    client.send("r", &json!(2)).await.unwrap();
    assert_eq!(next(&mut messages).await.sender.as_deref(), Some("fresh-1"));

    // The server restarts: the client reconnects with a fresh token from the provider.
    let addr = node.addr;
    node.hub.shutdown(Duration::from_secs(5)).await;
    drop(node);
    support::until("the client to notice", async || !client.is_connected()).await;
    let _node = Node::start_on(addr, layer()).await;
    support::until("the client to reconnect", async || client.is_connected()).await;
    // A new in-memory node has no record of the rooms: join again.
    client.subscribe("r").await.unwrap();
    client.send("r", &json!(3)).await.unwrap();
    let sender = next(&mut messages).await.sender.unwrap_or_default();
    assert!(
        sender.starts_with("fresh-") && sender != "fresh-1",
        "{sender}"
    );
    assert!(asked.load(Ordering::SeqCst) >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_recovers_history_rooms_across_a_restart_and_reports_gaps() {
    let redis = RedisServer::start().await;
    let layer = || history_layer(&redis, |builder| builder);
    let node = Node::start(layer()).await;
    let other = Node::start(layer()).await;
    let addr = node.addr;
    let (client, mut messages, gaps) = client_telling_gaps(node.url(), "hank").await;
    client.subscribe("h:c").await.unwrap();
    let mut publisher = Client::connect(&other.url()).await;
    for n in 1..=3 {
        publisher.publish("h:c", json!(n)).await;
    }
    for n in 1..=3u64 {
        assert_eq!(next(&mut messages).await.offset, Some(n));
    }
    // The node goes away; messages go on through the other node meanwhile.
    node.hub.shutdown(Duration::from_secs(5)).await;
    drop(node);
    support::until("the client to notice", async || !client.is_connected()).await;
    for n in 4..=6 {
        publisher.publish("h:c", json!(n)).await;
    }
    let _node = Node::start_on(addr, layer()).await;
    // Back: the missed ones, once, in order, then live ones.
    for n in 4..=6u64 {
        let got = next(&mut messages).await;
        assert_eq!((got.offset, got.payload), (Some(n), json!(n)));
    }
    publisher.publish("h:c", json!(7)).await;
    assert_eq!(next(&mut messages).await.offset, Some(7));
    let history = client.history("h:c", Some(2)).await.unwrap();
    assert_eq!(history.offset, 7);
    let kept: Vec<_> = history.messages.iter().map(|m| m.offset).collect();
    assert_eq!(kept, [Some(6), Some(7)]);
    assert!(gaps.lock().unwrap().is_empty());
    let refused = client.history("plain", None).await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::NotEnabled));

    // The room's history lost while the client is away (its keys expired, say): a gap,
    // not a silent hole.
    let node_addr = addr;
    _node.hub.shutdown(Duration::from_secs(5)).await;
    drop(_node);
    support::until("the client to notice", async || !client.is_connected()).await;
    let mut admin = redis.client().await;
    let _: () = redis::cmd("DEL")
        .arg("thinws:meta:{h:c}")
        .arg("thinws:frames:{h:c}")
        .query_async(&mut admin)
        .await
        .unwrap();
    let _node = Node::start_on(node_addr, layer()).await;
    support::until("the gap to be reported", async || {
        !gaps.lock().unwrap().is_empty()
    })
    .await;
    assert_eq!(gaps.lock().unwrap()[0].room, "h:c");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_asks_for_presence_and_hears_joins_and_leaves() {
    use thinws::client::Member;
    use thinws::settings::Presence;
    let redis = RedisServer::start().await;
    let layer = || {
        ThinWsLayer::builder()
            .redis_url(redis.url())
            .presence(Presence::WithJoinLeave)
            .build()
    };
    let (a, b) = (Node::start(layer()).await, Node::start(layer()).await);
    let (events, mut heard) = tokio::sync::mpsc::unbounded_channel();
    let leaves = events.clone();
    let (alice, _messages) = ThinWsClient::builder(a.url(), "alice")
        .on_join(move |m: Member| drop(events.send(format!("join {} {}", m.room, m.connection_id))))
        .on_leave(move |m: Member| {
            drop(leaves.send(format!("leave {} {}", m.room, m.connection_id)))
        })
        .connect()
        .await
        .unwrap();
    alice.subscribe("lobby").await.unwrap();
    let (bob, _bob_messages) = ThinWsClient::connect(b.url(), "bob").await.unwrap();
    bob.subscribe("lobby").await.unwrap();
    let presence = alice.presence("lobby").await.unwrap();
    let mut members = presence.members.clone();
    members.sort();
    assert_eq!(
        (presence.count, members),
        (2, vec!["alice".into(), "bob".into()])
    );
    bob.unsubscribe("lobby").await.unwrap();
    for want in ["join lobby alice", "join lobby bob", "leave lobby bob"] {
        let got = within("a presence event", heard.recv()).await.unwrap();
        assert_eq!(got, want);
    }
    assert_eq!(alice.presence("lobby").await.unwrap().count, 1);
    let err = ThinWsClient::connect(Node::start(ThinWsLayer::in_memory()).await.url(), "carol")
        .await
        .unwrap()
        .0
        .presence("lobby")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotEnabled));
}

/// The original ThinWS server sends deliveries without `connectionID`: the client delivers
/// them with no sender instead of dropping them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_without_a_sender_is_delivered() {
    let redis = RedisServer::start().await;
    let node = Node::redis(&redis).await;
    let (client, mut messages) = ThinWsClient::connect(node.url(), "c").await.unwrap();
    client.subscribe("r").await.unwrap();
    let mut conn = redis.client().await;
    let _: i64 = redis::cmd("PUBLISH")
        .arg("thinws:room:{r}")
        .arg(r#"{"type":"message","roomID":"r","payload":{"old":true}}"#)
        .query_async(&mut conn)
        .await
        .unwrap();
    let got = next(&mut messages).await;
    assert_eq!((got.sender, got.payload), (None, json!({"old": true})));
}

//! Hooks as tower services, over real sockets.

mod support;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use support::{within, Client, Node};
use thinws::hooks::{
    ConnectEvent, ConnectVerdict, DisconnectEvent, Grant, Happened, MessageEvent, MessageVerdict,
    Notification, SubscribeEvent, UnsubscribeEvent, Verdict,
};
use thinws::ThinWsLayer;
use tokio::sync::{mpsc, Semaphore};
use tower::{service_fn, ServiceBuilder};

type Log = Arc<Mutex<Vec<String>>>;

fn disconnect_log(
    log: &Log,
) -> impl tower::Service<DisconnectEvent, Response = (), Error = Infallible, Future = impl Send>
       + Clone
       + Send
       + Sync
       + 'static {
    let log = log.clone();
    service_fn(move |event: DisconnectEvent| {
        let log = log.clone();
        async move {
            log.lock().unwrap().push(format!(
                "{}:{:?}",
                event.socket().connection_id(),
                event.reason()
            ));
            Ok::<_, Infallible>(())
        }
    })
}

async fn wait_for_log(log: &Log, n: usize) -> Vec<String> {
    within(&format!("{n} disconnect events"), async {
        loop {
            let entries = log.lock().unwrap().clone();
            if entries.len() >= n {
                return entries;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
}

#[tokio::test]
async fn hooks_allow_refuse_assign_and_replace() {
    let layer = ThinWsLayer::builder()
        .on_connect(service_fn(|event: ConnectEvent| async move {
            // The upgrade request travels with every event.
            let user = event
                .socket()
                .request()
                .headers
                .get("x-user")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            Ok::<_, Infallible>(match (event.connection_id(), user) {
                ("banned", _) => ConnectVerdict::refuse("banned identity"),
                (_, Some(user)) => ConnectVerdict::Assign(user),
                _ => ConnectVerdict::Accept,
            })
        }))
        .on_subscribe(service_fn(|event: SubscribeEvent| async move {
            Ok::<_, Infallible>(if event.room().starts_with("private") {
                Verdict::refuse("private rooms are closed")
            } else {
                Verdict::Allow
            })
        }))
        .on_unsubscribe(service_fn(|event: UnsubscribeEvent| async move {
            Ok::<_, Infallible>(if event.room() == "sticky" {
                Verdict::refuse("sticky")
            } else {
                Verdict::Allow
            })
        }))
        .on_message(service_fn(|event: MessageEvent| async move {
            let text: String = event.payload_as().unwrap_or_default();
            if text == "spam" {
                return Ok(MessageVerdict::refuse("no spam"));
            }
            if text == "shout" {
                return MessageVerdict::replace(
                    &json!({"text": "SHOUT", "by": event.socket().connection_id()}),
                );
            }
            Ok(MessageVerdict::Allow)
        }))
        .build();
    let node = Node::start(layer).await;

    let mut c = Client::connect(&node.url()).await;
    let reply = c
        .request(json!({"type": "connect", "connectionID": "banned"}))
        .await;
    assert_eq!(reply["code"], "forbidden");
    assert_eq!(reply["message"], "banned identity");
    let reply = c
        .request(json!({"type": "connect", "connectionID": "carol"}))
        .await;
    assert_eq!(reply["type"], "ack");

    // Refused subscribe: forbidden, and the socket is not a member.
    let reply = c
        .request(json!({"type": "subscribe", "roomID": "private-1"}))
        .await;
    assert_eq!(reply["code"], "forbidden", "{reply}");
    assert_eq!(reply["message"], "private rooms are closed");
    assert_eq!(node.hub.member_count("private-1"), 0);
    c.subscribe("sticky").await;
    let reply = c
        .request(json!({"type": "unsubscribe", "roomID": "sticky"}))
        .await;
    assert_eq!(reply["code"], "forbidden");
    assert_eq!(node.hub.member_count("sticky"), 1);

    // Refused message: nothing is published; replaced payload: the replacement is.
    let reply = c
        .request(json!({"type": "message", "roomID": "sticky", "payload": "spam"}))
        .await;
    assert_eq!(reply["code"], "forbidden");
    c.publish("sticky", json!("shout")).await;
    let got = c.delivery().await;
    assert_eq!(
        got["payload"],
        json!({"text": "SHOUT", "by": "carol"}),
        "the refused spam never arrived first"
    );
}

/// A payload a `message` hook puts in the client's place goes through the checks a
/// client's does: one no JSON parser reads back, or nested too deep, is the hook's failure
/// (`internal`), and nothing is delivered.
#[tokio::test]
async fn a_replaced_payload_no_client_could_send_is_not_delivered() {
    let layer = ThinWsLayer::builder()
        .on_message(service_fn(|event: MessageEvent| async move {
            let text: String = event.payload_as().unwrap_or_default();
            let raw = match text.as_str() {
                "surrogate" => r#""\ud800""#.to_owned(),
                "deep" => format!("{}{}", "[".repeat(100), "]".repeat(100)),
                "huge" => "1e400".to_owned(),
                _ => return Ok::<_, Infallible>(MessageVerdict::Allow),
            };
            let raw = serde_json::value::RawValue::from_string(raw).unwrap();
            Ok(MessageVerdict::Replace(raw))
        }))
        .build();
    let node = Node::start(layer).await;
    let mut c = Client::connect(&node.url()).await;
    c.subscribe("r").await;
    for text in ["surrogate", "deep", "huge"] {
        let reply = c
            .request(json!({"type": "message", "roomID": "r", "payload": text}))
            .await;
        assert_eq!(reply["code"], "internal", "{text}: {reply}");
    }
    c.publish("r", json!("fine")).await;
    assert_eq!(c.delivery().await["payload"], "fine", "nothing before it");
}

#[tokio::test]
async fn an_assigned_identity_comes_from_the_upgrade_request() {
    let layer = ThinWsLayer::builder()
        .on_connect(service_fn(|event: ConnectEvent| async move {
            let uri = event.socket().request().uri.clone();
            Ok::<_, Infallible>(match uri.query().and_then(|q| q.strip_prefix("user=")) {
                Some(user) => ConnectVerdict::Assign(user.to_owned()),
                None => ConnectVerdict::refuse("no user"),
            })
        }))
        .build();
    let node = Node::start(layer).await;
    let mut c = Client::connect_as(&format!("ws://{}/?user=erin", node.addr), "anything").await;
    c.subscribe("r").await;
    c.publish("r", json!(1)).await;
    assert_eq!(c.delivery().await["connectionID"], "erin");
}

#[tokio::test]
async fn a_failing_or_timed_out_hook_refuses_safely() {
    let layer = ThinWsLayer::builder()
        .on_subscribe(
            ServiceBuilder::new()
                .timeout(Duration::from_millis(100))
                .service_fn(|event: SubscribeEvent| async move {
                    match event.room() {
                        "broken" => Err::<Verdict, _>(std::io::Error::other("database down")),
                        "slow" => {
                            tokio::time::sleep(Duration::from_secs(3600)).await;
                            Ok(Verdict::Allow)
                        }
                        _ => Ok(Verdict::Allow),
                    }
                }),
        )
        .build();
    let node = Node::start(layer).await;
    let mut c = Client::connect(&node.url()).await;
    for room in ["broken", "slow"] {
        let reply = c
            .request(json!({"type": "subscribe", "roomID": room}))
            .await;
        assert_eq!(reply["code"], "internal", "{reply}");
        assert!(
            !reply["message"].as_str().unwrap().contains("database"),
            "no internals leak: {reply}"
        );
        assert_eq!(node.hub.member_count(room), 0);
    }
    c.subscribe("fine").await;
}

/// A hook that fails with a `HookError` chooses the client's error: `unavailable` (nothing
/// happened), or a refusal with its own code; a recorded room refused with any code is
/// skipped at `connect`, while one the hook cannot decide on fails the `connect`.
#[tokio::test]
async fn a_hook_error_chooses_what_the_client_is_told() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use thinws::hooks::HookError;
    use thinws::protocol::ErrorCode;
    let closed = Arc::new(AtomicBool::new(false));
    let layer = ThinWsLayer::builder()
        .on_subscribe(service_fn({
            let closed = closed.clone();
            move |event: SubscribeEvent| {
                let closed = closed.load(Ordering::SeqCst);
                async move {
                    match event.room() {
                        "full" => Err(HookError::refused(ErrorCode::LimitExceeded, "room is full")),
                        "down" => Err(HookError::unavailable(std::io::Error::other(
                            "backend down",
                        ))),
                        "later" if closed => Err(HookError::refused(
                            ErrorCode::InvalidMessage,
                            "not any more",
                        )),
                        _ => Ok(Verdict::Allow),
                    }
                }
            }
        }))
        .build();
    let node = Node::start(layer).await;
    let mut c = Client::connect(&node.url()).await;
    let reply = c
        .request(json!({"type": "subscribe", "roomID": "full"}))
        .await;
    assert_eq!(
        (&reply["code"], &reply["message"]),
        (&json!("limit_exceeded"), &json!("room is full")),
        "{reply}"
    );
    let reply = c
        .request(json!({"type": "subscribe", "roomID": "down"}))
        .await;
    assert_eq!(reply["code"], "unavailable", "{reply}");
    assert_eq!(node.hub.member_count("down"), 0);

    // A recorded room the hook now refuses is skipped at connect; the others are rejoined.
    let mut first = Client::connect_as(&node.url(), "rae").await;
    first.subscribe("later").await;
    first.subscribe("open").await;
    first.close().await;
    closed.store(true, Ordering::SeqCst);
    let mut again = Client::connect(&node.url()).await;
    let reply = again
        .request(json!({"type": "connect", "connectionID": "rae", "since": {}}))
        .await;
    assert_eq!(reply["type"], "ack", "{reply}");
    assert_eq!(reply["rooms"], json!({"open": {}}), "{reply}");
}

/// A `connect` asks the subscribe hook about its identity's recorded rooms several at a
/// time, not one after another (with a hook over HTTP, one round trip each): here the
/// hook answers none of them until all eight are waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_asks_the_subscribe_hook_about_recorded_rooms_together() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let armed = Arc::new(AtomicBool::new(false));
    let all_waiting = Arc::new(tokio::sync::Barrier::new(8));
    let layer = ThinWsLayer::builder()
        .on_subscribe(service_fn({
            let armed = armed.clone();
            move |_: SubscribeEvent| {
                let armed = armed.load(Ordering::SeqCst);
                let all_waiting = all_waiting.clone();
                async move {
                    if armed {
                        all_waiting.wait().await;
                    }
                    Ok::<_, Infallible>(Verdict::Allow)
                }
            }
        }))
        .build();
    let node = Node::start(layer).await;
    let mut first = Client::connect_as(&node.url(), "many").await;
    for i in 0..8 {
        first.subscribe(&format!("room{i}")).await;
    }
    first.close().await;
    armed.store(true, Ordering::SeqCst);
    let mut again = Client::connect(&node.url()).await;
    let reply = within(
        "a connect whose eight recorded rooms wait for each other in the hook",
        again.request(json!({"type": "connect", "connectionID": "many", "since": {}})),
    )
    .await;
    assert_eq!(reply["type"], "ack", "{reply}");
    let rooms = reply["rooms"].as_object().expect("rooms");
    assert_eq!(rooms.len(), 8, "{reply}");
}

/// A hook that answers `unavailable` past two calls at once, as the HTTP backend does past
/// `--proxy-max-in-flight`: a `connect` asks about more recorded rooms than that at once,
/// and still rejoins all six, asking about the rest one at a time once told so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_rejoins_through_a_hook_with_fewer_slots_than_it_asks_about() {
    use thinws::hooks::HookError;
    let slots = Arc::new(Semaphore::new(2));
    let layer = ThinWsLayer::builder()
        .on_subscribe(service_fn(move |_: SubscribeEvent| {
            let slots = slots.clone();
            async move {
                let Ok(_slot) = slots.try_acquire() else {
                    return Err(HookError::unavailable(std::io::Error::other(
                        "no free slot",
                    )));
                };
                // Held a moment, so that the calls made at once overlap.
                tokio::time::sleep(Duration::from_millis(20)).await;
                Ok(Verdict::Allow)
            }
        }))
        .build();
    let node = Node::start(layer).await;
    let mut first = Client::connect_as(&node.url(), "few").await;
    for i in 0..6 {
        first.subscribe(&format!("room{i}")).await;
    }
    first.close().await;
    let mut again = Client::connect(&node.url()).await;
    let reply = again
        .request(json!({"type": "connect", "connectionID": "few", "since": {}}))
        .await;
    assert_eq!(reply["type"], "ack", "{reply}");
    let rooms = reply["rooms"].as_object().expect("rooms");
    assert_eq!(rooms.len(), 6, "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_fires_exactly_once_however_the_socket_ends() {
    let log: Log = Arc::default();
    let node = Node::start(
        ThinWsLayer::builder()
            .on_disconnect(disconnect_log(&log))
            .build(),
    )
    .await;

    // Says disconnect, then closes: one event, Requested.
    let mut said = Client::connect_as(&node.url(), "said").await;
    let reply = said.request(json!({"type": "disconnect"})).await;
    assert_eq!(reply["type"], "ack");
    said.close().await;
    // Closes.
    let closed = Client::connect_as(&node.url(), "closed").await;
    closed.close().await;
    // Vanishes: the TCP connection drops without a close frame.
    let vanished = Client::connect_as(&node.url(), "vanished").await;
    drop(vanished);
    support::until("all sockets to go", async || node.hub.socket_count() == 0).await;
    let mut entries = wait_for_log(&log, 3).await;
    entries.sort();
    assert_eq!(entries.len(), 3, "{entries:?}");
    assert_eq!(entries[0], "closed:Closed");
    assert_eq!(entries[1], "said:Requested");
    assert!(entries[2].starts_with("vanished:"), "{entries:?}");

    // Server shutdown: one event each, Server.
    let s = Client::connect_as(&node.url(), "shut").await;
    node.hub.shutdown(Duration::from_secs(5)).await;
    let entries = wait_for_log(&log, 4).await;
    assert_eq!(entries[3], "shut:Server");
    drop(s);
}

/// A subscribe hook that blocks on rooms named "slow*" until released, and reports when it
/// is entered.
fn gate() -> (
    impl tower::Service<SubscribeEvent, Response = Verdict, Error = Infallible, Future = impl Send>
        + Clone
        + Send
        + Sync
        + 'static,
    mpsc::UnboundedReceiver<String>,
    Arc<Semaphore>,
) {
    let (entered_tx, entered) = mpsc::unbounded_channel();
    let gate = Arc::new(Semaphore::new(0));
    let g = gate.clone();
    let hook = service_fn(move |event: SubscribeEvent| {
        let entered_tx = entered_tx.clone();
        let gate = g.clone();
        async move {
            if event.room().starts_with("slow") {
                let _ = entered_tx.send(event.room().to_owned());
                let _permit = gate.acquire().await;
            }
            Ok::<_, Infallible>(Verdict::Allow)
        }
    });
    (hook, entered, gate)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_hook_on_one_socket_delays_only_that_socket_whose_frames_stay_in_order() {
    let (hook, mut entered, gate) = gate();
    let node = Node::start(ThinWsLayer::builder().on_subscribe(hook).build()).await;
    let mut slow = Client::connect(&node.url()).await;
    // Three frames back to back: the first blocks in the hook.
    for (id, room) in [(1, "slow-1"), (2, "fast-2"), (3, "fast-3")] {
        slow.send_text(json!({"type": "subscribe", "messageID": id, "roomID": room}).to_string())
            .await;
    }
    assert_eq!(within("the hook", entered.recv()).await.unwrap(), "slow-1");

    // Another socket goes about its business meanwhile.
    let mut other = Client::connect(&node.url()).await;
    other.subscribe("fast-2").await;
    other.publish("fast-2", json!("meanwhile")).await;
    assert_eq!(other.delivery().await["payload"], "meanwhile");
    assert_eq!(node.hub.member_count("slow-1"), 0);
    assert_eq!(
        node.hub.member_count("fast-2"),
        1,
        "the slow socket's later frames wait their turn"
    );

    gate.add_permits(1);
    for id in 1..=3 {
        let v = slow.recv().await;
        assert_eq!(v["type"], "ack");
        assert_eq!(v["messageID"], id, "acks in frame order");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_that_closes_while_its_hook_runs_ends_in_no_room_and_still_fires_disconnect() {
    close_during_hooks(ThinWsLayer::builder(), None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_that_closes_while_its_hook_runs_leaves_no_redis_subscription() {
    let redis = support::RedisServer::start().await;
    close_during_hooks(ThinWsLayer::builder().redis_url(redis.url()), Some(&redis)).await;
}

async fn close_during_hooks(builder: thinws::ThinWsBuilder, redis: Option<&support::RedisServer>) {
    let log: Log = Arc::default();
    let (hook, mut entered, _gate) = gate();
    let node = Node::start(
        builder
            .on_subscribe(hook)
            .on_connect(service_fn(|event: ConnectEvent| async move {
                if event.connection_id() == "slow-connect" {
                    std::future::pending::<()>().await;
                }
                Ok::<_, Infallible>(ConnectVerdict::Accept)
            }))
            .on_disconnect(disconnect_log(&log))
            .build(),
    )
    .await;

    // Closes while its subscribe hook runs, with an earlier room joined.
    let mut c = Client::connect(&node.url()).await;
    c.subscribe("joined").await;
    c.send_text(json!({"type": "subscribe", "messageID": 9, "roomID": "slow-room"}).to_string())
        .await;
    assert_eq!(
        within("the hook", entered.recv()).await.unwrap(),
        "slow-room"
    );
    c.close().await;

    // Closes while its connect hook runs.
    let mut d = Client::connect(&node.url()).await;
    d.subscribe("joined").await;
    d.send_text(
        json!({"type": "connect", "messageID": 1, "connectionID": "slow-connect"}).to_string(),
    )
    .await;
    // Vanish rather than close, for variety.
    drop(d);

    let entries = wait_for_log(&log, 2).await;
    assert_eq!(entries.len(), 2, "{entries:?}");
    support::until("all sockets to go", async || node.hub.socket_count() == 0).await;
    assert_eq!(node.hub.room_count(), 0, "no room is left behind");
    if let Some(redis) = redis {
        let mut conn = redis.client().await;
        within("the node to unsubscribe at Redis", async {
            loop {
                let channels: Vec<String> = redis::cmd("PUBSUB")
                    .arg("CHANNELS")
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                if channels.is_empty() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
    }
}

/// A socket that ends while its `connect` rejoins the identity's rooms never bound that
/// identity: the `disconnect` hook is told the socket's own, unbound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_that_ends_during_its_connect_is_reported_as_it_was() {
    let (hook, mut entered, gate) = gate();
    let bound: Arc<Mutex<Vec<bool>>> = Arc::default();
    let seen = bound.clone();
    let node = Node::start(
        ThinWsLayer::builder()
            .on_subscribe(hook)
            .on_disconnect(service_fn(move |event: DisconnectEvent| {
                seen.lock()
                    .unwrap()
                    .push(event.socket().has_bound_identity());
                async move { Ok::<_, Infallible>(()) }
            }))
            .build(),
    )
    .await;
    // alice's identity records a room whose subscribe hook will block.
    let mut alice = Client::connect_as(&node.url(), "alice").await;
    gate.add_permits(1);
    alice.subscribe("slow-room").await;
    assert_eq!(
        within("the hook", entered.recv()).await.unwrap(),
        "slow-room"
    );
    // The hook hands its permit back: take it away, so that the next call blocks.
    gate.acquire().await.unwrap().forget();
    alice.close().await;
    support::until("alice to go", async || bound.lock().unwrap().len() == 1).await;

    // Another socket connects as alice; its rejoin blocks on the room, and it closes.
    let mut c = Client::connect(&node.url()).await;
    c.send_text(json!({"type": "connect", "messageID": 1, "connectionID": "alice"}).to_string())
        .await;
    assert_eq!(
        within("the rejoin", entered.recv()).await.unwrap(),
        "slow-room"
    );
    c.close().await;
    support::until("the socket to go", async || {
        bound.lock().unwrap().len() == 2
    })
    .await;
    assert_eq!(
        *bound.lock().unwrap(),
        [true, false],
        "alice bound; the other never did"
    );
}

#[tokio::test]
async fn a_connect_hook_can_put_the_socket_in_rooms_without_the_subscribe_hook() {
    let layer = ThinWsLayer::builder()
        .max_rooms_per_socket(4)
        .on_connect(service_fn(|event: ConnectEvent| async move {
            let id = event.connection_id().to_owned();
            let grant = match id.as_str() {
                "greedy" => (0..5).fold(Grant::new(), |g, n| g.room(format!("r{n}"))),
                "broken" => Grant::new().room("user:broken").room(""),
                _ => Grant::new().room(format!("user:{id}")),
            };
            Ok::<_, Infallible>(ConnectVerdict::Grant(grant))
        }))
        .on_subscribe(service_fn(|_: SubscribeEvent| async move {
            Ok::<_, Infallible>(Verdict::refuse("nobody subscribes here"))
        }))
        .build();
    let node = Node::start(layer).await;

    let mut alice = Client::connect_as(&node.url(), "alice").await;
    let mut bob = Client::connect_as(&node.url(), "bob").await;
    bob.publish("user:alice", json!("for alice")).await;
    let got = alice.delivery().await;
    assert_eq!(
        (&got["roomID"], &got["payload"]),
        (&json!("user:alice"), &json!("for alice"))
    );
    // Subscribing is still the subscribe hook's to decide.
    let refused = alice
        .request(json!({"type": "subscribe", "roomID": "lobby"}))
        .await;
    assert_eq!(refused["code"], "forbidden");

    // More rooms than the socket may hold, or a room that cannot be used: the connect
    // fails and the socket is in no room.
    let mut greedy = Client::connect(&node.url()).await;
    let refused = greedy
        .request(json!({"type": "connect", "connectionID": "greedy"}))
        .await;
    assert_eq!(refused["code"], "limit_exceeded", "{refused}");
    let mut broken = Client::connect(&node.url()).await;
    let refused = broken
        .request(json!({"type": "connect", "connectionID": "broken"}))
        .await;
    assert_eq!(refused["code"], "internal", "{refused}");
    assert_eq!(node.hub.member_count("r0"), 0);
    assert_eq!(node.hub.member_count("user:broken"), 0);
    assert_eq!(node.hub.room_count(), 2, "user:alice and user:bob");
}

/// A notification the hook refuses for good (`HookError::refused`; a webhook answered 400)
/// is dropped, not sent again for ever ahead of the ones after it: here the hook refuses the
/// first it is given and takes the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_refused_for_good_is_dropped_and_the_next_ones_go() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use thinws::hooks::HookError;
    use thinws::protocol::ErrorCode;
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = seen.clone();
    let refused_one = Arc::new(AtomicBool::new(false));
    let refused = refused_one.clone();
    let layer = ThinWsLayer::builder()
        .on_notification(service_fn(move |n: Notification| {
            let (log, refused_one) = (log.clone(), refused_one.clone());
            async move {
                if !refused_one.swap(true, Ordering::SeqCst) {
                    return Err(HookError::refused(ErrorCode::InvalidMessage, "never"));
                }
                let line = match n.what() {
                    Happened::RoomOccupied { room, .. } => format!("occupied {room}"),
                    Happened::RoomVacated { room, .. } => format!("vacated {room}"),
                    _ => return Ok(()),
                };
                log.lock().unwrap().push(line);
                Ok(())
            }
        }))
        .build();
    let node = Node::start(layer).await;
    let mut c = Client::connect_as(&node.url(), "ann").await;
    c.subscribe("r").await;
    // Once its occupancy was told (and refused), not coalesced with the vacancy.
    support::until("the first notification", async || {
        refused.load(Ordering::SeqCst)
    })
    .await;
    c.unsubscribe("r").await;
    // Sent again, the refused one would come first (one lane per room keeps the order).
    assert_eq!(wait_for_log(&seen, 1).await, ["vacated r"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_tell_occupied_vacated_join_leave_and_disconnect_in_order() {
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = seen.clone();
    let layer = ThinWsLayer::builder()
        .presence(thinws::settings::Presence::On)
        .on_notification(service_fn(move |n: Notification| {
            let log = log.clone();
            async move {
                let line = match n.what() {
                    Happened::RoomOccupied { room, .. } => format!("occupied {room}"),
                    Happened::RoomVacated { room, .. } => format!("vacated {room}"),
                    Happened::Join { room, identity, .. } => format!("join {room} {identity}"),
                    Happened::Leave { room, identity, .. } => format!("leave {room} {identity}"),
                    Happened::Disconnect { socket, .. } => {
                        format!("disconnect {}", socket.connection_id())
                    }
                    _ => "other".into(),
                };
                log.lock().unwrap().push(line);
                Ok::<_, Infallible>(())
            }
        }))
        .build();
    let node = Node::start(layer).await;
    let mut alice = Client::connect_as(&node.url(), "alice").await;
    let mut alice_too = Client::connect_as(&node.url(), "alice").await;
    alice.subscribe("game").await;
    alice_too.subscribe("game").await;
    alice.unsubscribe("game").await;
    alice_too.close().await;
    let lines = wait_for_log(&seen, 5).await;
    // Occupancy and presence are decided apart: each kind keeps its order.
    let of = |kinds: [&str; 2]| -> Vec<&str> {
        lines
            .iter()
            .map(String::as_str)
            .filter(|l| kinds.iter().any(|k| l.starts_with(k)))
            .collect()
    };
    assert_eq!(
        of(["occupied", "vacated"]),
        ["occupied game", "vacated game"]
    );
    assert_eq!(
        of(["join", "leave"]),
        ["join game alice", "leave game alice"]
    );
    assert!(lines.contains(&"disconnect alice".to_owned()), "{lines:?}");
}

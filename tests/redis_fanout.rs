//! Cross-node guarantees, each on a private Redis with two hubs and real WebSocket clients.

mod support;

use redis::AsyncCommands;
use serde_json::json;
use support::{acl, within, Client, Node, RedisServer};
use thinws::ThinWsLayer;

async fn numsub(redis: &RedisServer, channel: &str) -> i64 {
    let mut conn = redis.client().await;
    let reply: (String, i64) = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(channel)
        .query_async(&mut conn)
        .await
        .unwrap();
    reply.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_published_after_the_subscribe_ack_reaches_the_socket_on_either_node() {
    let redis = RedisServer::start().await;
    let a = Node::redis(&redis).await;
    let b = Node::redis(&redis).await;
    // Repeat with fresh rooms, so that every round needs a new Redis subscription whose
    // confirmation must come before the ack.
    let mut publisher = Client::connect(&a.url()).await;
    for round in 0..50 {
        let room = format!("room-{round}");
        let url = if round % 2 == 0 { a.url() } else { b.url() };
        let mut subscriber = Client::connect(&url).await;
        subscriber.subscribe(&room).await;
        publisher.publish(&room, json!(round)).await;
        let got = subscriber.delivery().await;
        assert_eq!(got["roomID"], room.as_str());
        assert_eq!(got["payload"], round);
        subscriber.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_requires_a_password_is_used_with_the_urls_credentials() {
    let redis = RedisServer::start_with_password("s3cret").await;
    let a = Node::redis(&redis).await;
    let b = Node::redis(&redis).await;
    let mut subscriber = Client::connect(&b.url()).await;
    subscriber.subscribe("locked").await;
    assert_eq!(numsub(&redis, "thinws:room:{locked}").await, 1);
    let mut publisher = Client::connect(&a.url()).await;
    publisher.publish("locked", json!("in")).await;
    assert_eq!(subscriber.delivery().await["payload"], "in");

    // A wrong password: the subscription cannot be made, and the client is told so.
    let wrong = redis.url().replace("s3cret", "wrong");
    let c = Node::start(ThinWsLayer::new(wrong)).await;
    let mut refused = Client::connect(&c.url()).await;
    let reply = refused
        .request(json!({"type": "subscribe", "roomID": "locked"}))
        .await;
    assert_eq!(reply["type"], "error", "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_messages_from_one_socket_reach_every_subscriber_on_both_nodes_in_order() {
    let redis = RedisServer::start().await;
    // Back to back is faster than the default rate limit allows.
    let node = || {
        Node::start(
            ThinWsLayer::builder()
                .redis_url(redis.url())
                .rate_limit(0, 0)
                .build(),
        )
    };
    let a = node().await;
    let b = node().await;
    let mut subscribers = Vec::new();
    for i in 0..6 {
        let url = if i % 2 == 0 { a.url() } else { b.url() };
        let mut c = Client::connect(&url).await;
        c.subscribe("stream").await;
        subscribers.push(c);
    }
    // The sender is subscribed too, and sends back to back: all frames first, then it
    // collects the acks.
    let mut sender = Client::connect_as(&a.url(), "sender").await;
    sender.subscribe("stream").await;
    const N: u64 = 1000;
    for i in 0..N {
        sender
            .send_text(
                json!({"type": "message", "messageID": format!("m{i}"), "roomID": "stream", "payload": {"seq": i}})
                    .to_string(),
            )
            .await;
    }
    let mut acks = 0;
    let mut own = 0;
    while acks < N || own < N {
        let v = sender.recv().await;
        match v["type"].as_str() {
            Some("ack") => {
                assert_eq!(v["messageID"], format!("m{acks}"), "acks in order");
                acks += 1;
            }
            Some("message") => {
                assert_eq!(v["payload"]["seq"], own, "sender's own copy in order");
                assert_eq!(v["connectionID"], "sender");
                own += 1;
            }
            _ => panic!("unexpected frame {v}"),
        }
    }
    for (n, c) in subscribers.iter_mut().enumerate() {
        for i in 0..N {
            let v = c.delivery().await;
            assert_eq!(
                v["payload"]["seq"], i,
                "subscriber {n}: message {i} out of order or lost"
            );
            assert_eq!(v["roomID"], "stream");
            assert_eq!(v["connectionID"], "sender");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_that_is_not_a_member_receives_nothing() {
    let redis = RedisServer::start().await;
    let a = Node::redis(&redis).await;
    let b = Node::redis(&redis).await;
    let mut member = Client::connect(&b.url()).await;
    member.subscribe("r").await;
    let mut outsiders = Vec::new();
    for url in [a.url(), b.url()] {
        let mut c = Client::connect(&url).await;
        c.subscribe("other").await;
        outsiders.push(c);
    }
    // A socket that joined and left again is not a member either.
    let mut left = Client::connect(&a.url()).await;
    left.subscribe("r").await;
    left.subscribe("other").await;
    left.unsubscribe("r").await;
    outsiders.push(left);

    let mut publisher = Client::connect(&a.url()).await;
    for i in 0..20 {
        publisher.publish("r", json!(i)).await;
    }
    publisher.publish("other", json!("marker")).await;
    for i in 0..20 {
        assert_eq!(member.delivery().await["payload"], i);
    }
    // Each outsider's first frame is the marker published after everything to "r": had
    // any "r" message leaked to it, it would have come first.
    for c in &mut outsiders {
        let v = c.delivery().await;
        assert_eq!(v["roomID"], "other", "{v}");
        assert_eq!(v["payload"], "marker");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ack_for_a_message_means_redis_accepted_the_publish() {
    let mut redis = RedisServer::start().await;
    let a = ThinWsLayer::builder()
        .redis_url(redis.url())
        .redis_timeout(std::time::Duration::from_millis(500))
        .build();
    let a = Node::start(a).await;
    let mut c = Client::connect(&a.url()).await;
    c.subscribe("r").await;
    // A raw Redis subscriber sees each acked publish.
    let mut raw = redis::Client::open(redis.url())
        .unwrap()
        .get_async_pubsub()
        .await
        .unwrap();
    raw.subscribe("thinws:room:{r}").await.unwrap();
    c.publish("r", json!("first")).await;
    let mut stream = raw.on_message();
    let msg = within(
        "the raw subscriber",
        futures_util::StreamExt::next(&mut stream),
    )
    .await
    .unwrap();
    let frame: serde_json::Value = serde_json::from_slice(msg.get_payload_bytes()).unwrap();
    assert_eq!(frame["payload"], "first");
    drop(stream);

    // With Redis gone, a message never gets an ack: `unavailable` when the node knows the
    // connection is gone before sending, `timeout` (outcome unknown) when it wrote the
    // publish to a connection Redis had closed before the node noticed (under load this
    // happens: both answers are true).
    redis.kill();
    let reply = c
        .request(json!({"type": "message", "roomID": "r", "payload": "lost"}))
        .await;
    assert_eq!(reply["type"], "error", "{reply}");
    assert!(
        reply["code"] == "unavailable" || reply["code"] == "timeout",
        "{reply}"
    );
    // The socket stays open and usable.
    let reply = c.request(json!({"type": "nope"})).await;
    assert_eq!(reply["code"], "unknown_type");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_holds_one_redis_subscription_per_room_with_local_members() {
    let redis = RedisServer::start().await;
    let a = Node::redis(&redis).await;
    let b = Node::redis(&redis).await;
    let channel = "thinws:room:{shared}";
    assert_eq!(numsub(&redis, channel).await, 0);

    let mut a1 = Client::connect(&a.url()).await;
    let mut a2 = Client::connect(&a.url()).await;
    a1.subscribe("shared").await;
    a2.subscribe("shared").await;
    // Two local members, one subscription.
    assert_eq!(numsub(&redis, channel).await, 1);
    let mut b1 = Client::connect(&b.url()).await;
    b1.subscribe("shared").await;
    assert_eq!(numsub(&redis, channel).await, 2);
    assert_eq!(a.hub.member_count("shared"), 2);

    a1.unsubscribe("shared").await;
    assert_eq!(
        numsub(&redis, channel).await,
        2,
        "a2 is still a member on node a"
    );
    // The last local member leaving by closing its socket drops the subscription.
    a2.close().await;
    support::members(&a.hub, "shared", 0).await;
    support::until("node a to unsubscribe", async || {
        numsub(&redis, channel).await == 1
    })
    .await;
    // And a message still reaches node b's member.
    a1.publish("shared", json!("still here")).await;
    assert_eq!(b1.delivery().await["payload"], "still here");

    // No other keys than the identity sets: anonymous sockets record nothing.
    let mut conn = redis.client().await;
    let keys: Vec<String> = conn.keys("*").await.unwrap();
    assert!(keys.is_empty(), "{keys:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_delivered_frame_is_built_once_and_forwarded_unchanged() {
    let redis = RedisServer::start().await;
    let a = Node::redis(&redis).await;
    let b = Node::redis(&redis).await;
    let mut on_b = Client::connect(&b.url()).await;
    on_b.subscribe("r").await;
    let mut raw = redis::Client::open(redis.url())
        .unwrap()
        .get_async_pubsub()
        .await
        .unwrap();
    raw.subscribe("thinws:room:{r}").await.unwrap();
    let mut sender = Client::connect_as(&a.url(), "alice").await;
    // Odd spacing in the payload survives: nobody re-serialises it.
    sender
        .send_text(r#"{"type":"message","messageID":1,"roomID":"r","payload":{ "a" : [1,  2] }}"#)
        .await;
    assert_eq!(sender.recv().await["type"], "ack");
    let mut stream = raw.on_message();
    let msg = within(
        "the raw subscriber",
        futures_util::StreamExt::next(&mut stream),
    )
    .await
    .unwrap();
    let published = String::from_utf8(msg.get_payload_bytes().to_vec()).unwrap();
    assert_eq!(
        published,
        r#"{"type":"message","roomID":"r","connectionID":"alice","payload":{ "a" : [1,  2] }}"#
    );
    let got = on_b.recv().await;
    assert_eq!(
        got,
        serde_json::from_str::<serde_json::Value>(&published).unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_senders_order_holds_with_many_publishes_in_flight_at_once() {
    let redis = RedisServer::start().await;
    let node = || {
        Node::start(
            ThinWsLayer::builder()
                .redis_url(redis.url())
                .rate_limit(0, 0)
                .build(),
        )
    };
    let a = node().await;
    let b = node().await;
    // Two receivers, one per node, reading as the messages come (a receiver that only read
    // at the end would be dropped as a slow reader).
    const SENDERS: usize = 20;
    const EACH: usize = 200;
    let mut receivers = Vec::new();
    for url in [a.url(), b.url()] {
        let mut c = Client::connect(&url).await;
        c.subscribe("busy").await;
        receivers.push(tokio::spawn(async move {
            let mut next = std::collections::HashMap::new();
            for _ in 0..SENDERS * EACH {
                let v = c.delivery().await;
                let sender = v["connectionID"].as_str().unwrap().to_owned();
                let expected = next.entry(sender.clone()).or_insert(0u64);
                assert_eq!(v["payload"], *expected, "{sender} out of order");
                *expected += 1;
            }
            c
        }));
    }
    // 20 sockets send 200 messages each, back to back and all at once: thousands of
    // publishes in flight over the nodes' publishing lanes.
    let mut senders = Vec::new();
    for s in 0..SENDERS {
        let url = if s % 2 == 0 { a.url() } else { b.url() };
        senders.push(tokio::spawn(async move {
            let mut c = Client::connect_as(&url, &format!("sender-{s}")).await;
            for i in 0..EACH {
                c.send_text(
                    json!({"type": "message", "messageID": i, "roomID": "busy", "payload": i})
                        .to_string(),
                )
                .await;
            }
            for i in 0..EACH {
                assert_eq!(c.reply_to(&json!(i)).await["type"], "ack");
            }
            c
        }));
    }
    let mut open = Vec::new();
    for s in senders {
        open.push(within("a sender", s).await.unwrap());
    }
    for r in receivers {
        open.push(within("a receiver", r).await.unwrap());
    }
}

/// A subscribe that Redis refuses (here a channel its ACL does not allow) fails alone: the
/// node's pub/sub connection stays up, the node's other rooms keep their messages without
/// a gap, and the room can be subscribed once Redis allows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_subscribe_leaves_the_other_rooms_alone() {
    let redis = RedisServer::start().await;
    let node = Node::redis(&redis).await;
    let mut member = Client::connect(&node.url()).await;
    member.subscribe("ok:1").await;
    let mut admin = redis.client().await;
    acl(&mut admin, &["resetchannels", "&thinws:room:{ok:*"]).await;
    let mut refused = Client::connect(&node.url()).await;
    for _ in 0..2 {
        let reply = refused
            .request(json!({"type": "subscribe", "roomID": "blocked"}))
            .await;
        assert_eq!(reply["type"], "error", "{reply}");
    }
    let mut publisher = Client::connect(&node.url()).await;
    publisher.publish("ok:1", json!("still here")).await;
    let frame = member.recv().await;
    assert_eq!(
        (frame["type"].as_str(), frame["payload"].as_str()),
        (Some("message"), Some("still here")),
        "no gap, no lost message: {frame}"
    );
    acl(&mut admin, &["allchannels"]).await;
    refused.subscribe("blocked").await;
    publisher.publish("blocked", json!("allowed")).await;
    assert_eq!(refused.delivery().await["payload"], "allowed");
}

/// When Redis stops allowing one room the node holds (an ACL change: Redis then cuts the
/// node's pub/sub connection), the node subscribes the others again on its next
/// connection and keeps it, tells the refused room's members that they may miss messages
/// (a gap), and takes the room back, with a gap, once Redis allows it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_refused_after_a_reconnection_leaves_the_others_subscribed() {
    let redis = RedisServer::start().await;
    let node = Node::redis(&redis).await;
    let mut kept = Client::connect(&node.url()).await;
    kept.subscribe("ok:1").await;
    let mut refused = Client::connect(&node.url()).await;
    refused.subscribe("blocked").await;
    let mut admin = redis.client().await;
    acl(&mut admin, &["resetchannels", "&thinws:room:{ok:*"]).await;
    // The connection was cut: both rooms may have missed messages.
    assert_eq!(kept.recv().await["type"], "gap");
    assert_eq!(refused.recv().await["type"], "gap");
    let mut publisher = Client::connect(&node.url()).await;
    publisher.publish("ok:1", json!("after")).await;
    assert_eq!(kept.delivery().await["payload"], "after");
    acl(&mut admin, &["allchannels"]).await;
    // Taken back at a retry: what it missed meanwhile is unknown.
    assert_eq!(refused.recv().await["type"], "gap");
    publisher.publish("blocked", json!("allowed")).await;
    assert_eq!(refused.delivery().await["payload"], "allowed");
    publisher.publish("ok:1", json!("still")).await;
    assert_eq!(kept.delivery().await["payload"], "still");
}

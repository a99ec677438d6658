//! Chaos: three `thinws` processes on one private Redis, 30 subscribers in 3 history rooms
//! (the Rust client, which reconnects to the next node in turn), 3 publishers sending acked
//! messages the whole time, while a node is killed with SIGKILL (its clients move to the
//! other nodes) and restarted 1.5 s later, every pub/sub connection is killed, Redis is frozen
//! for 3 s, and every node is restarted with SIGTERM in turn. Every subscriber must receive
//! every acked message of its room exactly once and in order. The publishers' client sends
//! a message again (with its idempotency key) after `timeout`, `unavailable` or a lost
//! connection, so every `send` resolves: a message whose send failed (a definite error)
//! must reach nobody, and none may be left pending past its deadline. A second run restarts Redis without its data:
//! every subscriber is told of the gap.
//!
//! Bounded: about 25 s per run. `THINWS_CHAOS_LONG=1` runs the faults three times over.

mod support;

#[path = "support/binary.rs"]
mod binary;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use binary::Server;
use futures_util::StreamExt;
use serde_json::json;
use support::{within, RedisServer};
use thinws::client::{ClientError, ThinWsClient};

const ROOMS: [&str; 3] = ["chaos:a", "chaos:b", "chaos:c"];

/// What one subscriber received: (publisher, seq, offset), in order.
type Received = Vec<(usize, u64, u64)>;
type Seen = Arc<Mutex<Received>>;

/// What one publisher's `send`s resolved to.
#[derive(Default)]
struct Sent {
    acked: Vec<u64>,
    /// Failed with a definite error: must reach nobody.
    failed: Vec<u64>,
    /// Failed at the caller's deadline: the outcome is unknown.
    unknown: Vec<u64>,
}

struct Outcome {
    /// (room, publisher) -> what its sends resolved to.
    sent: HashMap<(usize, usize), Sent>,
    /// Per subscriber: its room and what it received (publisher, seq, offset).
    received: Vec<(usize, Received)>,
    gaps: usize,
}

async fn run(
    redis: &mut RedisServer,
    nodes: &mut [Server],
    rounds: usize,
    lose_redis: bool,
) -> Outcome {
    let gaps = Arc::new(Mutex::new(0usize));
    let mut subscribers = Vec::new();
    for i in 0..30 {
        let room = i % 3;
        let node = &nodes[i % nodes.len()];
        let others: Vec<String> = nodes
            .iter()
            .filter(|n| n.addr != node.addr)
            .map(Server::url)
            .collect();
        let gaps = gaps.clone();
        let (client, mut messages) = ThinWsClient::builder(node.url(), format!("sub-{i}"))
            .fallback_urls(others)
            .max_backoff(Duration::from_millis(200))
            .request_timeout(Duration::from_secs(20))
            .on_gap(move |_| *gaps.lock().unwrap() += 1)
            .connect()
            .await
            .unwrap();
        client.subscribe(ROOMS[room]).await.unwrap();
        let seen: Seen = Arc::default();
        let collect = tokio::spawn({
            let seen = seen.clone();
            async move {
                while let Some(m) = messages.next().await {
                    let (Some(p), Some(seq), Some(offset)) =
                        (m.payload["p"].as_u64(), m.payload["seq"].as_u64(), m.offset)
                    else {
                        continue;
                    };
                    seen.lock().unwrap().push((p as usize, seq, offset));
                }
            }
        });
        subscribers.push((room, client, seen, collect));
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut publishers = Vec::new();
    for p in 0..3 {
        let url = nodes[p % nodes.len()].url();
        let others: Vec<String> = nodes
            .iter()
            .map(Server::url)
            .filter(|u| *u != url)
            .collect();
        let stop = stop.clone();
        publishers.push(tokio::spawn(async move {
            let (client, _messages) = ThinWsClient::builder(url, format!("pub-{p}"))
                .fallback_urls(others)
                .max_backoff(Duration::from_millis(200))
                .request_timeout(Duration::from_secs(20))
                .connect()
                .await
                .unwrap();
            let mut sent = Sent::default();
            let mut seq = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                seq += 1;
                // The client sends a message again (same key) after `timeout`,
                // `unavailable` or a lost connection, until it is published once.
                match client.send(ROOMS[p], &json!({"p": p, "seq": seq})).await {
                    Ok(()) => sent.acked.push(seq),
                    // A definite refusal: nothing was published.
                    Err(ClientError::Server { .. } | ClientError::Disconnected) => {
                        sent.failed.push(seq);
                        tokio::time::sleep(Duration::from_millis(20)).await
                    }
                    // Past the 20 s deadline: the outcome is unknown.
                    Err(ClientError::Timeout) => sent.unknown.push(seq),
                    Err(e) => panic!("publisher {p}: {e}"),
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            client.close().await;
            (p, sent)
        }));
    }

    let mut admin = redis.client().await;
    for _ in 0..rounds {
        tokio::time::sleep(Duration::from_secs(2)).await;
        // Its clients reconnect to the other nodes while it is down.
        nodes[0].kill_and_restart(Duration::from_millis(1500)).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let _: Result<i64, _> = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("pubsub")
            .query_async(&mut admin)
            .await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        if lose_redis {
            redis.restart().await;
            admin = redis.client().await;
        } else {
            redis.freeze();
            tokio::time::sleep(Duration::from_secs(3)).await;
            redis.thaw();
        }
        // Every node is back on Redis before the rolling restart.
        for node in nodes.iter() {
            node.healthy().await;
        }
        for node in nodes.iter_mut() {
            node.restart().await;
            node.healthy().await;
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut sent = HashMap::new();
    for publisher in publishers {
        let (p, seqs) = within("a publisher to stop", publisher).await.unwrap();
        sent.insert((p, p), seqs);
    }
    // Wait (a bounded time) until every subscriber has every acked message of its room or,
    // once Redis lost its data, was told of a gap; the callers' assertions say what did not
    // arrive.
    let caught_up = || {
        if lose_redis {
            return *gaps.lock().unwrap() >= subscribers.len();
        }
        subscribers.iter().all(|(room, _, seen, _)| {
            let seen = seen.lock().unwrap();
            let got: std::collections::HashSet<u64> = seen.iter().map(|&(_, seq, _)| seq).collect();
            sent[&(*room, *room)]
                .acked
                .iter()
                .all(|seq| got.contains(seq))
        })
    };
    let give_up = tokio::time::Instant::now() + Duration::from_secs(15);
    while !caught_up() && tokio::time::Instant::now() < give_up {
        tokio::time::sleep(support::POLL).await;
    }
    let mut received = Vec::new();
    for (room, client, seen, collect) in subscribers {
        client.close().await;
        let _ = collect.await;
        received.push((room, seen.lock().unwrap().clone()));
    }
    let gaps = *gaps.lock().unwrap();
    Outcome {
        sent,
        received,
        gaps,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acked_message_reaches_every_subscriber_once_in_order_through_faults() {
    let rounds = if std::env::var_os("THINWS_CHAOS_LONG").is_some() {
        3
    } else {
        1
    };
    let mut redis = RedisServer::start().await;
    let mut nodes = vec![
        Server::with_history(&redis, &[]).await,
        Server::with_history(&redis, &[]).await,
        Server::with_history(&redis, &[]).await,
    ];
    let outcome = run(&mut redis, &mut nodes, rounds, false).await;
    let (mut missing, mut duplicated, mut out_of_order, mut total) = (0, 0, 0, 0);
    let mut failed_but_delivered = 0;
    for (room, seen) in &outcome.received {
        let sent = &outcome.sent[&(*room, *room)];
        let acked = &sent.acked;
        let mut count: BTreeMap<u64, usize> = BTreeMap::new();
        let mut last_offset = 0;
        let mut last_seq = 0;
        for &(p, seq, offset) in seen {
            assert_eq!(p, *room, "a message of another room");
            *count.entry(seq).or_default() += 1;
            if offset <= last_offset || seq <= last_seq {
                out_of_order += 1;
            }
            last_offset = offset;
            last_seq = seq;
        }
        duplicated += count.values().filter(|n| **n > 1).count();
        missing += acked.iter().filter(|seq| !count.contains_key(seq)).count();
        failed_but_delivered += sent
            .failed
            .iter()
            .filter(|seq| count.contains_key(seq))
            .count();
        total += acked.len();
    }
    let failed: usize = outcome.sent.values().map(|s| s.failed.len()).sum();
    let unknown: usize = outcome.sent.values().map(|s| s.unknown.len()).sum();
    println!(
        "chaos: {total} acked deliveries expected; missing {missing}, duplicated {duplicated}, out of order {out_of_order}; sends failed {failed} (delivered anyway {failed_but_delivered}), unknown {unknown}; gaps reported {}",
        outcome.gaps
    );
    assert_eq!((missing, duplicated, out_of_order), (0, 0, 0));
    assert_eq!(failed_but_delivered, 0, "a failed send was delivered");
    assert_eq!(unknown, 0, "a send was left pending past its deadline");
    assert!(total > 1000, "the publishers got through: {total}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_loses_its_data_is_reported_as_a_gap_never_a_silent_hole() {
    let mut redis = RedisServer::start().await;
    let mut nodes = vec![
        Server::with_history(&redis, &[]).await,
        Server::with_history(&redis, &[]).await,
        Server::with_history(&redis, &[]).await,
    ];
    let outcome = run(&mut redis, &mut nodes, 1, true).await;
    println!("gaps reported: {}", outcome.gaps);
    // Every subscriber had received messages before the loss, so each learns of it.
    assert!(
        outcome.gaps >= 30,
        "{} gaps for 30 subscribers",
        outcome.gaps
    );
}

//! Webhooks (notifications) from real nodes to the example backends (real processes): a
//! room occupied and vacated once for the whole cluster, joins and leaves in presence rooms,
//! disconnects, a dead node's rooms vacated by a survivor, and a backend that was down
//! receiving everything, in order, once it is back.

mod support;

#[path = "support/binary.rs"]
mod binary;

#[path = "support/backend.rs"]
mod backend;

use std::time::Duration;

use backend::{Backend, Webhooks, BACKENDS, SECRET};
use binary::{metric, Server};
use serde_json::Value;
use support::{free_port, http, within, Client, RedisServer, TempDir};

/// A node named `name` on `redis` whose webhooks go to `backend` (signed), with presence
/// in every room and a 2 s presence and occupancy lease.
async fn node(redis: &RedisServer, backend: &Backend, name: &str) -> (Server, TempDir) {
    let dir = TempDir::new("webhook");
    let secret = dir.file("secret", SECRET);
    let webhook = backend.url("webhook");
    let server = Server::start(&[
        "--redis-url",
        &redis.url(),
        "--webhook-url",
        &webhook,
        "--proxy-secret-file",
        secret.to_str().unwrap(),
        "--proxy-timeout",
        "1",
        "--presence",
        "--presence-ttl",
        "2",
        "--node-name",
        name,
        "--no-demo",
    ])
    .await;
    (server, dir)
}

/// The webhooks of `event` about `room`.
fn of(webhooks: &Webhooks, event: &str, room: &str) -> Vec<Value> {
    webhooks
        .lock()
        .unwrap()
        .iter()
        .filter(|w| w["event"] == event && w["room"] == room)
        .cloned()
        .collect()
}

/// Waits until the backend logged `n` webhooks of `event` about `room`.
async fn logged(webhooks: &Webhooks, event: &str, room: &str, n: usize) {
    support::until(&format!("{n} × {event} of {room}"), async || {
        of(webhooks, event, room).len() >= n
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_over_two_nodes_is_occupied_and_vacated_once() {
    for example in BACKENDS {
        occupied_and_vacated_once(example).await;
    }
}

async fn occupied_and_vacated_once(example: (&str, &str)) {
    let redis = RedisServer::start().await;
    let webhooks = Webhooks::default();
    let backend = Backend::logging(example, free_port(), webhooks.clone()).await;
    let (a, _secret_a) = node(&redis, &backend, "node-a").await;
    let (b, _secret_b) = node(&redis, &backend, "node-b").await;

    let mut alice_a = Client::connect_as(&a.url(), "alice").await;
    alice_a.subscribe("game").await;
    logged(&webhooks, "room_occupied", "game", 1).await;
    let mut alice_b = Client::connect_as(&b.url(), "alice").await;
    alice_b.subscribe("game").await;
    let mut bob_b = Client::connect_as(&b.url(), "bob").await;
    bob_b.subscribe("game").await;
    logged(&webhooks, "join", "game", 2).await;

    alice_a.unsubscribe("game").await;
    alice_b.close().await;
    bob_b.unsubscribe("game").await;
    logged(&webhooks, "room_vacated", "game", 1).await;
    logged(&webhooks, "leave", "game", 2).await;
    // Whatever else was going to come has had time to.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let occupied = of(&webhooks, "room_occupied", "game");
    let vacated = of(&webhooks, "room_vacated", "game");
    assert_eq!(
        (occupied.len(), vacated.len()),
        (1, 1),
        "{occupied:?} {vacated:?}"
    );
    assert!(
        vacated[0]["seq"].as_u64() > occupied[0]["seq"].as_u64(),
        "{occupied:?} {vacated:?}"
    );
    let identities = |event| {
        let mut ids: Vec<Value> = of(&webhooks, event, "game")
            .into_iter()
            .map(|w| w["identity"].clone())
            .collect();
        ids.sort_by_key(|id| id.to_string());
        ids
    };
    // Alice had a socket on each node: one join and one leave, like bob.
    assert_eq!(identities("join"), ["alice", "bob"]);
    assert_eq!(identities("leave"), ["alice", "bob"]);
    // Alice joined through node A and left through node B: their numbers order them.
    let seq_of = |event, identity: &str| {
        of(&webhooks, event, "game")
            .iter()
            .find(|w| w["identity"] == identity)
            .and_then(|w| w["seq"].as_u64())
    };
    for identity in ["alice", "bob"] {
        let (join, leave) = (seq_of("join", identity), seq_of("leave", identity));
        assert!(
            join.is_some() && leave > join,
            "{identity}: {join:?} {leave:?}"
        );
    }
    // The socket that closed was reported, with its node, its identity and why.
    within("alice's disconnect", async {
        loop {
            let gone = webhooks.lock().unwrap().iter().any(|w| {
                w["event"] == "disconnect"
                    && w["node"] == "node-b"
                    && w["socket"]["identity"] == "alice"
                    && w["reason"] == "closed"
            });
            if gone {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    // A node dies with the only member of a room: a survivor sweeps its lease out and the
    // room is vacated, once.
    let mut solo = Client::connect_as(&a.url(), "carol").await;
    solo.subscribe("solo").await;
    logged(&webhooks, "room_occupied", "solo", 1).await;
    drop(a); // SIGKILL: no goodbye
    logged(&webhooks, "room_vacated", "solo", 1).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(of(&webhooks, "room_vacated", "solo").len(), 1);
    drop((b, bob_b, alice_a, solo));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_wait_for_a_backend_that_is_down_and_arrive_in_order() {
    for example in BACKENDS {
        arrive_in_order(example).await;
    }
}

async fn arrive_in_order(example: (&str, &str)) {
    let redis = RedisServer::start().await;
    let mut redis_client = redis.client().await;
    let webhooks = Webhooks::default();
    let port = free_port();
    let backend = Backend::logging(example, port, webhooks.clone()).await;
    let (server, _secret) = node(&redis, &backend, "node").await;
    let mut client = Client::connect_as(&server.url(), "dave").await;

    drop(backend);
    // The room's sequence number, as Redis has it (each occupied and vacated takes a new,
    // higher one).
    let seq = |redis_client: &mut redis::aio::MultiplexedConnection| {
        let mut redis_client = redis_client.clone();
        async move {
            redis::cmd("HGET")
                .arg("thinws:occupancy:{r}")
                .arg("#")
                .query_async::<Option<u64>>(&mut redis_client)
                .await
                .unwrap()
                .unwrap_or(0)
        }
    };
    // Waits until Redis numbered the room's next change, and returns its number.
    let next = async |redis_client: &mut redis::aio::MultiplexedConnection, last: u64| {
        let mut now = 0;
        support::until("the room's next number at Redis", async || {
            now = seq(redis_client).await;
            now > last
        })
        .await;
        now
    };
    let mut last = 0;
    for _round in 1..=3 {
        client.subscribe("r").await;
        last = next(&mut redis_client, last).await;
        client.unsubscribe("r").await;
        last = next(&mut redis_client, last).await;
    }
    // Nothing reached the backend, and the node counted its failed attempts.
    support::until("a failed webhook attempt counted", async || {
        server.metric("thinws_notifications_failed_total").await >= 1.0
    })
    .await;
    let (_, metrics) = http(server.addr, "GET", "/metrics", &[]).await;
    assert!(
        metric(&metrics, "thinws_notifications_failed_total") >= 1.0,
        "{metrics}"
    );
    assert_eq!(metric(&metrics, "thinws_notifications_dropped_total"), 0.0);

    // A last subscribe while the backend is still down: the room ends occupied.
    client.subscribe("r").await;
    let occupied = next(&mut redis_client, last).await;

    // Back.
    let _backend = Backend::logging(example, port, webhooks.clone()).await;
    support::until("the room's last change", async || {
        of(&webhooks, "room_occupied", "r")
            .iter()
            .any(|w| w["seq"].as_u64() == Some(occupied))
    })
    .await;
    let events: Vec<(String, u64)> = webhooks
        .lock()
        .unwrap()
        .iter()
        .filter(|w| w["room"] == "r" && w["event"].as_str().unwrap().starts_with("room_"))
        .map(|w| {
            (
                w["event"].as_str().unwrap().to_owned(),
                w["seq"].as_u64().unwrap(),
            )
        })
        .collect();
    // While the backend was down, each change superseded the queued one: the backend hears
    // of the change the node had tried to send, then the room's last state (occupied,
    // numbered last), in order.
    let last = ("room_occupied".to_owned(), occupied);
    assert_eq!(events.last(), Some(&last), "{events:?}");
    assert!(events.len() <= 2, "{events:?}");
    assert!(events.windows(2).all(|w| w[0].1 < w[1].1), "{events:?}");
    let (_, metrics) = http(server.addr, "GET", "/metrics", &[]).await;
    assert_eq!(metric(&metrics, "thinws_notifications_dropped_total"), 0.0);
    assert!(
        metric(&metrics, "thinws_notifications_superseded_total") >= 5.0,
        "{metrics}"
    );
    client.unsubscribe("r").await;
    let vacated = next(&mut redis_client, occupied).await;
    support::until("the room vacated", async || {
        of(&webhooks, "room_vacated", "r")
            .iter()
            .any(|w| w["seq"].as_u64() == Some(vacated))
    })
    .await;

    // A graceful shutdown sends what its sockets' end made before the node exits, and
    // gives its lease up.
    client.subscribe("last").await;
    logged(&webhooks, "room_occupied", "last", 1).await;
    server.terminate();
    assert!(server.exited().await.success());
    logged(&webhooks, "room_vacated", "last", 1).await;
    logged(&webhooks, "leave", "last", 1).await;
    let gone = webhooks.lock().unwrap().iter().any(|w| {
        w["event"] == "disconnect" && w["socket"]["identity"] == "dave" && w["reason"] == "server"
    });
    assert!(gone, "{:?}", webhooks.lock().unwrap());
    let live: u64 = redis::cmd("ZCARD")
        .arg("thinws:occupancy-leases:{leases}:live")
        .query_async(&mut redis_client)
        .await
        .unwrap();
    assert_eq!(live, 0, "the lease was given up");
}

/// Redis lost a room's registration while the node's lease survived (one cluster shard
/// lost its data): the node's check of its registrations registers it again (the room is
/// told occupied again), so that the room's `room_vacated` still comes when it empties.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_redis_lost_is_made_again() {
    let redis = RedisServer::start().await;
    let webhooks = Webhooks::default();
    let backend = Backend::logging(BACKENDS[0], free_port(), webhooks.clone()).await;
    let (a, _secret) = node(&redis, &backend, "node-a").await;
    let mut alice = Client::connect_as(&a.url(), "alice").await;
    alice.subscribe("healed").await;
    logged(&webhooks, "room_occupied", "healed", 1).await;
    let mut admin = redis.client().await;
    let _: () = redis::cmd("DEL")
        .arg("thinws:occupancy:{healed}")
        .query_async(&mut admin)
        .await
        .unwrap();
    // Checked every 12 renewal periods: about 12 s with this node's 3 s lease.
    support::eventually("registered again", Duration::from_secs(30), async || {
        (of(&webhooks, "room_occupied", "healed").len() >= 2).then_some(())
    })
    .await;
    alice.unsubscribe("healed").await;
    logged(&webhooks, "room_vacated", "healed", 1).await;
    // The room's occupancy numbers grow (joins and leaves are numbered apart; a webhook
    // the backend took but whose answer was late can arrive twice, the same).
    let mut seqs: Vec<(String, u64)> = webhooks
        .lock()
        .unwrap()
        .iter()
        .filter(|w| w["room"] == "healed" && w["event"].as_str().unwrap().starts_with("room_"))
        .map(|w| (w["event"].to_string(), w["seq"].as_u64().unwrap()))
        .collect();
    seqs.dedup();
    assert!(seqs.windows(2).all(|w| w[0].1 < w[1].1), "{seqs:?}");
}

//! The shipped deployment, tested: `deploy/nginx.conf` and `deploy/haproxy.cfg` (with only
//! their ports and certificate paths replaced) in front of three `thinws` processes on one
//! private Redis. Through each proxy: clients land on different nodes and messages cross
//! them; a node killed with SIGKILL loses its clients to the survivors, which get their
//! rooms back and recover the history room; a rolling restart (SIGTERM node by node, each
//! draining first) loses no acked message; `wss://` through the proxy's TLS. Every acked
//! message is counted at every subscriber: exactly once, in order.
//!
//! `scripts/test` installs nginx and haproxy from Debian when they are missing.

mod support;

#[path = "support/binary.rs"]
mod binary;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use binary::Server;
use futures_util::StreamExt;
use serde_json::json;
use support::certs::TestCerts;
use support::{free_port, http, listening, within, Client, RedisServer, TempDir};
use thinws::client::{Messages, ThinWsClient};

const ROOM: &str = "deploy:history";

/// A proxy process, stopped on drop with SIGTERM (nginx's workers would outlive a SIGKILL
/// of their master, holding its ports).
struct Stopped(Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

/// One thinws node on `redis`, with history and the HTTP API.
async fn thinws(redis: &RedisServer) -> Server {
    let extra = ["--api-key", "k", "--drain-seconds", "1"];
    Server::with_history(redis, &extra).await
}

/// `node`'s members of `room` (its HTTP API).
async fn local_members(node: &Server, room: &str) -> u64 {
    let (status, body) = http(
        node.addr,
        "GET",
        &format!("/api/rooms/{room}"),
        &[("Authorization", "apikey k")],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    body["localMembers"].as_u64().unwrap()
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Nginx,
    Haproxy,
}

/// A proxy from `deploy/`, on private ports.
struct Proxy {
    port: u16,
    tls_port: u16,
    _proc: Stopped,
    _dir: TempDir,
}

impl Proxy {
    async fn start(kind: Kind, nodes: &[Server], certs: &TestCerts) -> Self {
        let (port, tls_port) = (free_port(), free_port());
        let dir = TempDir::new(&format!("{kind:?}"));
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
        let mut config = std::fs::read_to_string(root.join(match kind {
            Kind::Nginx => "nginx.conf",
            Kind::Haproxy => "haproxy.cfg",
        }))
        .unwrap();
        // Only ports and paths change: the rest is what ships.
        for (n, node) in nodes.iter().enumerate() {
            config = config.replace(&format!("127.0.0.1:{}", 8081 + n), &node.addr.to_string());
        }
        let tls = |p: &Path| p.to_string_lossy().into_owned();
        config = config
            .replace("listen 8080;", &format!("listen 127.0.0.1:{port};"))
            .replace(
                "listen 8443 ssl;",
                &format!("listen 127.0.0.1:{tls_port} ssl;"),
            )
            .replace("127.0.0.1:8080", &format!("127.0.0.1:{port}"))
            .replace("127.0.0.1:8443", &format!("127.0.0.1:{tls_port}"))
            .replace("/etc/thinws/tls/cert.pem", &tls(&certs.cert()))
            .replace("/etc/thinws/tls/key.pem", &tls(&certs.key()))
            .replace("/etc/thinws/tls/haproxy.pem", &tls(&certs.cert_and_key()))
            .replace("/run/thinws-nginx.pid", &tls(&dir.join("nginx.pid")));
        let file = dir.join("proxy.conf");
        std::fs::write(&file, &config).unwrap();
        let mut command = match kind {
            Kind::Nginx => {
                let mut c = Command::new("nginx");
                c.arg("-c").arg(&file).arg("-p").arg(dir.path());
                c.args(["-e", "stderr", "-g", "daemon off;"]);
                c
            }
            Kind::Haproxy => {
                let mut c = Command::new("haproxy");
                c.arg("-f").arg(&file).arg("-db");
                c
            }
        };
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{kind:?} is needed (scripts/test installs it): {e}"));
        listening(port).await;
        listening(tls_port).await;
        Proxy {
            port,
            tls_port,
            _proc: Stopped(child),
            _dir: dir,
        }
    }

    fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/", self.port)
    }
}

/// What one subscriber received in the history room: the publisher's sequence numbers.
type Seen = Arc<Mutex<Vec<u64>>>;

fn collect(mut messages: Messages) -> Seen {
    let seen = Seen::default();
    let into = seen.clone();
    tokio::spawn(async move {
        while let Some(delivery) = messages.next().await {
            if delivery.room == ROOM {
                if let Some(seq) = delivery.payload.as_u64() {
                    into.lock().unwrap().push(seq);
                }
            }
        }
    });
    seen
}

async fn scenario(kind: Kind) {
    let certs = TestCerts::new();
    let redis = RedisServer::start().await;
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(thinws(&redis).await);
    }
    let proxy = Proxy::start(kind, &nodes, &certs).await;

    // Clients land on different nodes, and messages cross them.
    let mut plain = Vec::new();
    for _ in 0..6 {
        let mut c = Client::connect(&proxy.url()).await;
        c.subscribe("plain").await;
        plain.push(c);
    }
    let mut spread = Vec::new();
    for node in &nodes {
        spread.push(local_members(node, "plain").await);
    }
    assert_eq!(spread.iter().sum::<u64>(), 6, "{spread:?}");
    assert!(
        spread.iter().filter(|n| **n > 0).count() >= 2,
        "{kind:?} spread the sockets: {spread:?}"
    );
    plain[0].publish("plain", json!("across")).await;
    for c in &mut plain {
        assert_eq!(c.delivery().await["payload"], "across");
    }
    drop(plain);

    // A page served through the proxy opens its socket there: its Origin (the proxy's host
    // and port) matches the Host the node sees. The nodes' own endpoints are not public.
    let origin = format!("http://127.0.0.1:{}", proxy.port);
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(proxy.url())
            .unwrap();
    request
        .headers_mut()
        .insert("Origin", origin.parse().unwrap());
    let (ws, _) = tokio_tungstenite::connect_async(request)
        .await
        .unwrap_or_else(|e| panic!("{kind:?}: a page's upgrade through the proxy: {e}"));
    let mut page = Client::from_stream(ws);
    page.subscribe("plain").await;
    let proxied: std::net::SocketAddr = format!("127.0.0.1:{}", proxy.port).parse().unwrap();
    for path in ["/metrics", "/healthz"] {
        assert_eq!(
            http(proxied, "GET", path, &[]).await.0,
            404,
            "{kind:?} {path}"
        );
    }
    drop(page);

    // Subscribers of a history room (the Rust client, which reconnects through the proxy
    // and recovers what it missed) and a publisher, all through the proxy.
    let mut subscribers = Vec::new();
    for n in 0..6 {
        let (client, messages) = ThinWsClient::builder(proxy.url(), format!("sub-{n}"))
            .max_backoff(Duration::from_millis(500))
            .connect()
            .await
            .unwrap();
        client.subscribe(ROOM).await.unwrap();
        subscribers.push((client, collect(messages)));
    }
    let (publisher, _) = ThinWsClient::builder(proxy.url(), "publisher")
        .max_backoff(Duration::from_millis(500))
        .request_timeout(Duration::from_secs(3))
        .connect()
        .await
        .unwrap();
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publishing = {
        let (acked, stop) = (acked.clone(), stop.clone());
        tokio::spawn(async move {
            let mut seq = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // An error (the publisher's node went away) leaves the outcome unknown:
                // such a message may arrive or not, but never twice or out of order.
                if publisher.send(ROOM, &seq).await.is_ok() {
                    acked.lock().unwrap().insert(seq);
                }
                seq += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    support::until("publishing to be under way", async || {
        acked.lock().unwrap().len() >= 20
            && subscribers
                .iter()
                .all(|(_, seen)| !seen.lock().unwrap().is_empty())
    })
    .await;

    // SIGKILL of a node with subscribers: they come back through the proxy elsewhere.
    let victim = {
        let mut most = (0, 0);
        for (i, node) in nodes.iter().enumerate() {
            let n = local_members(node, ROOM).await;
            if n > most.1 {
                most = (i, n);
            }
        }
        assert!(most.1 > 0, "no node has a subscriber");
        most.0
    };
    nodes[victim].signal("-KILL");
    nodes[victim].stopped().await;
    // Back means: in the room on one of the other nodes, every one of them.
    support::until("every subscriber to be back on another node", async || {
        let mut members = 0;
        for (i, node) in nodes.iter().enumerate() {
            if i != victim {
                members += local_members(node, ROOM).await;
            }
        }
        members == subscribers.len() as u64 && subscribers.iter().all(|(c, _)| c.is_connected())
    })
    .await;
    nodes[victim].start_again().await;

    // A rolling restart: SIGTERM node by node; each drains (503 on /healthz and on
    // upgrades) for a second, then closes its sockets with 1001 and exits.
    for restarting in 0..nodes.len() {
        let node = &mut nodes[restarting];
        node.terminate();
        let addr = node.addr;
        support::until("/healthz to say 503 while the node drains", async || {
            http(addr, "GET", "/healthz", &[]).await.0 == 503
        })
        .await;
        node.stopped().await;
        node.start_again().await;
        node.healthy().await;
        // Every subscriber is back in the room before the next node goes.
        support::until("every subscriber to be back in the room", async || {
            let mut members = 0;
            for node in &nodes {
                members += local_members(node, ROOM).await;
            }
            members == subscribers.len() as u64 && subscribers.iter().all(|(c, _)| c.is_connected())
        })
        .await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    publishing.await.unwrap();

    // Every acked message reached every subscriber, once each, in order.
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 100,
        "only {} messages were acked",
        acked.len()
    );
    for (n, (_, seen)) in subscribers.iter().enumerate() {
        within(
            &format!("subscriber {n} to have every acked message"),
            async {
                loop {
                    let got: BTreeSet<u64> = seen.lock().unwrap().iter().copied().collect();
                    if acked.is_subset(&got) {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        )
        .await;
        let got = seen.lock().unwrap().clone();
        assert!(
            got.windows(2).all(|w| w[0] < w[1]),
            "subscriber {n}: a duplicate or a reordering in {got:?}"
        );
    }
    println!(
        "{kind:?}: {} acked messages, each received once and in order by all 6 subscribers through a SIGKILL and a rolling restart",
        acked.len()
    );

    // wss:// through the proxy's TLS, with the test CA.
    let url = format!("wss://127.0.0.1:{}/", proxy.tls_port);
    let (tls_client, mut messages) = ThinWsClient::builder(url, "secure")
        .tls_ca_pem(certs.ca_pem())
        .connect()
        .await
        .unwrap();
    tls_client.subscribe("tls").await.unwrap();
    tls_client.send("tls", &json!("through TLS")).await.unwrap();
    let got = within("a delivery over wss", messages.next())
        .await
        .unwrap();
    assert_eq!(got.payload, json!("through TLS"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_behind_nginx() {
    scenario(Kind::Nginx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_behind_haproxy() {
    scenario(Kind::Haproxy).await;
}

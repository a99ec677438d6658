//! The standalone `thinws` binary: start-up, health, a two-process cluster, shutdown.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::json;
use support::{http, within, Client, RedisServer};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

const BIN: &str = env!("CARGO_BIN_EXE_thinws");

struct Server {
    child: Child,
    addr: std::net::SocketAddr,
}

impl Server {
    async fn start(args: &[&str]) -> Server {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let child = Command::new(BIN)
            .args(["--listen", &addr.to_string()])
            .args(args)
            .env_remove("REDIS_URL")
            .env_remove("THINWS_LISTEN")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        within("the server to listen", async {
            while tokio::net::TcpStream::connect(addr).await.is_err() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        Server { child, addr }
    }

    fn url(&self) -> String {
        format!("ws://{}/", self.addr)
    }

    /// Sends SIGTERM.
    fn terminate(&self) {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    }

    /// Waits for the process to exit.
    async fn exited(mut self) -> std::process::ExitStatus {
        within("the server to exit", async {
            loop {
                if let Some(status) = self.child.try_wait().unwrap() {
                    return status;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_memory_server_serves_health_and_sockets_and_shuts_down_with_1001() {
    let server = Server::start(&[]).await;
    assert_eq!(
        http(server.addr, "GET", "/healthz", &[]).await,
        (200, "ok\n".into())
    );
    assert_eq!(http(server.addr, "GET", "/nope", &[]).await.0, 404);
    let mut a = Client::connect(&server.url()).await;
    let mut b = Client::connect(&server.url()).await;
    a.subscribe("r").await;
    b.publish("r", json!("hello")).await;
    assert_eq!(a.delivery().await["payload"], "hello");

    server.terminate();
    // Both sockets are told to go away, then the process exits with 0.
    assert_eq!(a.closed().await, CloseCode::Away);
    assert_eq!(b.closed().await, CloseCode::Away);
    let status = server.exited().await;
    assert!(status.success(), "exited with {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_on_one_redis_form_a_cluster_and_health_follows_redis() {
    let mut redis = RedisServer::start().await;
    let url = redis.url();
    let a = Server::start(&["--redis-url", &url]).await;
    let b = Server::start(&["--redis-url", &url, "--path", "/ws"]).await;
    let mut on_a = Client::connect(&a.url()).await;
    let mut on_b = Client::connect(&format!("ws://{}/ws", b.addr)).await;
    on_b.subscribe("r").await;
    on_a.publish("r", json!("across")).await;
    assert_eq!(on_b.delivery().await["payload"], "across");
    assert_eq!(http(a.addr, "GET", "/healthz", &[]).await.0, 200);

    redis.kill();
    let (status, body) = http(a.addr, "GET", "/healthz", &[]).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("publish"), "{body}");
}

#[tokio::test]
async fn bad_redis_settings_exit_non_zero_with_one_line() {
    for url in ["not a url", "redis://127.0.0.1:1"] {
        let output = Command::new(BIN)
            .args(["--listen", "127.0.0.1:0", "--redis-url", url])
            .output()
            .unwrap();
        assert!(!output.status.success());
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.starts_with("thinws: "), "{stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_in_prometheus_text() {
    let redis = RedisServer::start().await;
    let server = Server::start(&["--redis-url", &redis.url()]).await;
    let mut a = Client::connect(&server.url()).await;
    a.subscribe("r").await;
    a.publish("r", json!(1)).await;
    a.delivery().await;
    let reply = a.request(json!({"type": "nope"})).await;
    assert_eq!(reply["code"], "unknown_type");
    let (status, body) = http(server.addr, "GET", "/metrics", &[]).await;
    assert_eq!(status, 200);
    for needle in [
        "thinws_sockets 1",
        "thinws_rooms 1",
        "thinws_redis_subscriptions 1",
        "thinws_frames_in_total 3",
        "thinws_publishes_total 1",
        "thinws_publish_duration_seconds_bucket{le=\"2.5\"} 1",
        "thinws_publish_duration_seconds_count 1",
        "thinws_errors_total{code=\"unknown_type\"} 1",
        "thinws_slow_reader_drops_total 0",
        "thinws_redis_reconnects_total 0",
    ] {
        assert!(body.contains(needle), "{needle:?} missing from:\n{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_moves_clients_to_the_other_node_with_their_rooms() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let a = Server::start(&["--redis-url", &url]).await;
    let b = Server::start(&["--redis-url", &url]).await;
    let mut clients = Vec::new();
    for name in ["ann", "ben", "cat"] {
        let mut c = Client::connect_as(&a.url(), name).await;
        c.subscribe("news").await;
        c.subscribe(&format!("dm-{name}")).await;
        clients.push((name, c));
    }
    let mut publisher = Client::connect(&b.url()).await;
    publisher.publish("news", json!("before")).await;
    for (_, c) in &mut clients {
        assert_eq!(c.delivery().await["payload"], "before");
    }

    // Node a is stopped: its clients are told to go away, and it exits cleanly.
    a.terminate();
    for (_, c) in &mut clients {
        assert_eq!(c.closed().await, CloseCode::Away);
    }
    assert!(a.exited().await.success());

    // They reconnect to node b, say who they are, and get their rooms back.
    let mut moved = Vec::new();
    for (name, _) in clients {
        moved.push((name, Client::connect_as(&b.url(), name).await));
    }
    publisher.publish("news", json!("after")).await;
    for (name, c) in &mut moved {
        assert_eq!(c.delivery().await["payload"], "after");
        publisher
            .publish(&format!("dm-{name}"), json!(format!("hi {name}")))
            .await;
        assert_eq!(c.delivery().await["payload"], format!("hi {name}"));
    }
}

#[tokio::test]
async fn the_demo_page_and_the_browser_client_are_served_by_default() {
    let server = Server::start(&["--path", "/ws"]).await;
    let (status, page) = http(server.addr, "GET", "/", &[]).await;
    assert_eq!(status, 200);
    assert!(page.contains("<title>thinws chat</title>"), "{page}");
    assert!(page.contains(r#"<script src="/thinws.js"></script>"#));
    assert!(
        page.contains(r#"content="/ws""#),
        "the page knows the socket path"
    );
    let (status, script) = http(server.addr, "GET", "/thinws.js", &[]).await;
    assert_eq!(status, 200);
    assert!(script.contains("class ThinWSClient"));

    let without = Server::start(&["--no-demo"]).await;
    assert_eq!(http(without.addr, "GET", "/", &[]).await.0, 404);
}

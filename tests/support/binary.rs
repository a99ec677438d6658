#![allow(dead_code)]
//! The standalone `thinws` binary, started as a process for a test (for tests with the
//! `server` feature).

use std::process::{Child, Command, Stdio};

use super::support::{eventually, free_port, until, within, DEADLINE};

pub const BIN: &str = env!("CARGO_BIN_EXE_thinws");

/// A `thinws` process on a private port, killed on drop. It can be signalled and started
/// again on the same port with the same arguments.
pub struct Server {
    pub child: Child,
    pub addr: std::net::SocketAddr,
    args: Vec<String>,
}

impl Server {
    /// Starts the binary with `args` on a free port and waits until it listens.
    pub async fn start(args: &[&str]) -> Server {
        let addr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let args: Vec<String> = args.iter().map(|arg| arg.to_string()).collect();
        let child = spawn(addr, &args);
        let mut server = Server { child, addr, args };
        server.listening().await;
        server
    }

    /// A node on `redis` with history in every room (10,000 messages), no demo page and no
    /// rate limit, a 2 s shutdown, and `extra` arguments: the fault tests' node.
    pub async fn with_history(redis: &super::support::RedisServer, extra: &[&str]) -> Server {
        let url = redis.url();
        let mut args = vec!["--redis-url", &url, "--history-size", "10000", "--no-demo"];
        args.extend(["--rate-limit", "0", "--shutdown-timeout", "2"]);
        args.extend(extra);
        Server::start(&args).await
    }

    /// A server started some other way (under a shell that sets its limits): killed on drop,
    /// not started again.
    pub fn adopt(child: Child, addr: std::net::SocketAddr) -> Server {
        let args = Vec::new();
        Server { child, addr, args }
    }

    async fn listening(&mut self) {
        let addr = self.addr;
        let child = &mut self.child;
        until("the server to listen", async || {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("the server exited before listening: {status}");
            }
            tokio::net::TcpStream::connect(addr).await.is_ok()
        })
        .await;
    }

    pub fn url(&self) -> String {
        format!("ws://{}/", self.addr)
    }

    /// Sends `signal` (`-TERM`, `-KILL`, `-STOP`…).
    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args([signal, &pid]).status().unwrap();
        assert!(sent.success(), "kill {signal} {pid}");
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        self.signal("-TERM");
    }

    /// Waits for the process to exit.
    pub async fn exited(mut self) -> std::process::ExitStatus {
        self.stopped().await
    }

    /// Waits for the process to exit, keeping the server to start again.
    pub async fn stopped(&mut self) -> std::process::ExitStatus {
        let child = &mut self.child;
        eventually("the server to exit", DEADLINE, async || {
            child.try_wait().unwrap()
        })
        .await
    }

    /// Starts the process again (it must have exited), on the same port with the same
    /// arguments, and waits until it listens.
    pub async fn start_again(&mut self) {
        self.child = spawn(self.addr, &self.args);
        self.listening().await;
    }

    /// SIGKILL; the server stays down `down`, then starts again.
    pub async fn kill_and_restart(&mut self, down: std::time::Duration) {
        self.signal("-KILL");
        self.stopped().await;
        tokio::time::sleep(down).await;
        self.start_again().await;
    }

    /// SIGTERM (a graceful shutdown), then the server starts again once it exited.
    pub async fn restart(&mut self) {
        self.terminate();
        self.stopped().await;
        self.start_again().await;
    }

    /// Waits until `/healthz` answers 200 (every Redis path works).
    pub async fn healthy(&self) {
        let addr = self.addr;
        until("the server to be healthy", async || {
            super::support::http(addr, "GET", "/healthz", &[]).await.0 == 200
        })
        .await;
    }

    /// The value of `name` (a metric without labels) on the server's `/metrics`.
    pub async fn metric(&self, name: &str) -> f64 {
        let (status, body) = super::support::http(self.addr, "GET", "/metrics", &[]).await;
        assert_eq!(status, 200, "{body}");
        metric(&body, name)
    }
}

/// The binary listening on `addr` with `args`, its output discarded.
fn spawn(addr: std::net::SocketAddr, args: &[String]) -> Child {
    Command::new(BIN)
        .args(["--listen", &addr.to_string()])
        .args(args)
        .env_remove("REDIS_URL")
        .env_remove("THINWS_LISTEN")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A token secret of the shortest length accepted (32 bytes).
pub const SECRET: &str = "0123456789abcdef0123456789abcdef";

/// An HS256 token with these claims.
pub fn hs256(secret: &str, claims: serde_json::Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// An HTTP request with a body; the status and the JSON body of the answer (`null` if not JSON).
pub async fn http_with_body(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, serde_json::Value) {
    let (status, _, body) = http_raw(addr, method, path, headers, body).await;
    (
        status,
        serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
    )
}

/// An HTTP request with a body; the status, the head and the body of the answer, as sent.
pub async fn http_raw(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    within("the API's answer", tcp.read_to_end(&mut response))
        .await
        .unwrap();
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response.split(' ').nth(1).unwrap().parse().unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    (status, head.to_owned(), body.to_owned())
}

/// Resident memory of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// The value of a Prometheus metric line without labels in `text` (0 when absent).
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

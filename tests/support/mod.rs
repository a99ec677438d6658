//! Shared test support: a private `redis-server` per test, nodes served over real TCP, and a
//! real WebSocket client that speaks the ThinWS protocol.
//!
//! Every helper waits on events (acks, deliveries, a PING answer) with a generous deadline
//! and fails the test with a clear message when the deadline passes; none sleeps to "let
//! things settle".
#![allow(dead_code)]

pub mod certs;
pub mod cluster;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use serde_json::{json, Value};
use thinws::{Hub, ThinWsLayer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tower::Layer;

/// How long any awaited event may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// Awaits `fut`, failing the test with `what` if it takes longer than [`DEADLINE`].
pub async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(DEADLINE, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {DEADLINE:?} waiting for {what}"),
    }
}

/// How often [`eventually`] and [`until`] look again.
pub const POLL: Duration = Duration::from_millis(10);

/// Calls `check` every [`POLL`] until it gives `Some`, and returns that; fails the test with
/// `what` after `timeout` (a `check` that hangs included).
pub async fn eventually<T>(
    what: &str,
    timeout: Duration,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> T {
    let poll = async move {
        loop {
            if let Some(value) = check().await {
                return value;
            }
            tokio::time::sleep(POLL).await;
        }
    };
    match tokio::time::timeout(timeout, poll).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {timeout:?} waiting for {what}"),
    }
}

/// Waits until `condition` holds, within [`DEADLINE`].
pub async fn until(what: &str, mut condition: impl AsyncFnMut() -> bool) {
    eventually(what, DEADLINE, async || condition().await.then_some(())).await
}

/// Waits until `read` gives the same value `times` readings in a row, [`POLL`] apart
/// (something has settled, for a measurement), within [`DEADLINE`]; returns that value.
pub async fn settled<T: PartialEq>(what: &str, times: usize, mut read: impl FnMut() -> T) -> T {
    let mut last = read();
    let mut same = 1;
    eventually(what, DEADLINE, async || {
        let now = read();
        same = if now == last { same + 1 } else { 1 };
        last = now;
        (same >= times).then_some(())
    })
    .await;
    last
}

/// Waits until `hub` reports ready (or not ready), within [`DEADLINE`].
pub async fn health_is(hub: &Hub, ready: bool) {
    until(&format!("health ready = {ready}"), async || {
        hub.health().await.is_ready() == ready
    })
    .await
}

/// A private `redis-server` on a free loopback port, stopped on drop.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    /// `requirepass`, when the server was started with one.
    password: Option<String>,
    /// With TLS: its port (beside the plain `port`, kept for probes) and its certificate.
    tls: Option<(u16, std::path::PathBuf, std::path::PathBuf)>,
}

impl RedisServer {
    /// Starts a new server and waits until it answers PING.
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    /// Starts a new server that requires `password` (of the `default` user).
    pub async fn start_with_password(password: &str) -> Self {
        Self::start_with(Some(password.to_owned())).await
    }

    async fn start_with(password: Option<String>) -> Self {
        for _ in 0..20 {
            let port = free_port();
            let mut server = RedisServer {
                child: None,
                port,
                password: password.clone(),
                tls: None,
            };
            if server.spawn().await {
                return server;
            }
        }
        panic!("could not start redis-server (is it installed?)");
    }

    /// Starts a server that also listens with TLS (certificate `certs.cert()`), on a port
    /// of its own: see [`RedisServer::tls_url`].
    pub async fn start_tls(certs: &certs::TestCerts) -> Self {
        for _ in 0..20 {
            let mut server = RedisServer {
                child: None,
                port: free_port(),
                password: None,
                tls: Some((free_port(), certs.cert(), certs.key())),
            };
            if server.spawn().await {
                return server;
            }
        }
        panic!("could not start redis-server with TLS (is it built with TLS?)");
    }

    /// `rediss://127.0.0.1:{tls port}`.
    pub fn tls_url(&self) -> String {
        let (port, ..) = self.tls.as_ref().expect("a TLS server");
        format!("rediss://127.0.0.1:{port}")
    }

    /// `redis://127.0.0.1:{port}`, with `default:{password}@` when there is a password.
    pub fn url(&self) -> String {
        match &self.password {
            Some(password) => format!("redis://default:{password}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    async fn spawn(&mut self) -> bool {
        let mut command = Command::new("redis-server");
        if let Some(password) = &self.password {
            command.args(["--requirepass", password]);
        }
        if let Some((port, cert, key)) = &self.tls {
            command
                .args(["--tls-port", &port.to_string()])
                .arg("--tls-cert-file")
                .arg(cert)
                .arg("--tls-key-file")
                .arg(key)
                .args(["--tls-auth-clients", "no"]);
        }
        let child = command
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--dir", &std::env::temp_dir().to_string_lossy()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while tokio::time::Instant::now() < deadline {
            if let Some(Some(_exit)) = self.child.as_mut().map(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                return false; // e.g. the port was taken meanwhile
            }
            if self.ping().await {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.kill();
        false
    }

    /// Whether the server answers PING now.
    pub async fn ping(&self) -> bool {
        let Ok(mut tcp) = TcpStream::connect(("127.0.0.1", self.port)).await else {
            return false;
        };
        let (request, answer): (String, &[u8]) = match &self.password {
            Some(password) => (format!("AUTH {password}\r\nPING\r\n"), b"+OK\r\n+PONG\r\n"),
            None => ("PING\r\n".to_owned(), b"+PONG\r\n"),
        };
        if tcp.write_all(request.as_bytes()).await.is_err() {
            return false;
        }
        let mut buf = vec![0u8; answer.len()];
        matches!(
            tokio::time::timeout(Duration::from_secs(1), tcp.read_exact(&mut buf)).await,
            Ok(Ok(_)) if buf == answer
        )
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("a running Redis").id()
    }

    /// Freezes the server with SIGSTOP: connections stay open, nothing is answered.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// Resumes a frozen server (SIGCONT).
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        send_signal(self.child.as_ref(), signal);
    }

    /// Kills the server with SIGKILL (its data is gone: it keeps nothing on disk).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port, with empty data.
    pub async fn restart(&mut self) {
        self.kill();
        for _ in 0..50 {
            if self.spawn().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("could not restart redis-server on port {}", self.port);
    }

    /// A plain Redis client connection to this server, for inspecting state.
    pub async fn client(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .expect("connect to the private redis")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A child process killed and reaped on drop (a test that panics leaks nothing).
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The headers of a WebSocket upgrade request (RFC 6455 §4.1, with its sample key), in
/// this order: `&UPGRADE[..2]` is an incomplete handshake.
pub const UPGRADE: [(&str, &str); 4] = [
    ("Connection", "Upgrade"),
    ("Upgrade", "websocket"),
    ("Sec-WebSocket-Version", "13"),
    ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
];

/// A WebSocket upgrade request for `/`, as a client writes it by hand (RFC 6455 §4.1, with
/// its sample key).
pub const UPGRADE_REQUEST: &str = "GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
    Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
    Sec-WebSocket-Version: 13\r\n\r\n";

/// Writes [`UPGRADE_REQUEST`] on `tcp` and reads the answer's head (byte by byte, so that
/// nothing after it is consumed), which must say `101`.
pub async fn upgrade_by_hand(tcp: &mut TcpStream) {
    tcp.write_all(UPGRADE_REQUEST.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let byte = within("the upgrade's answer", tcp.read_u8()).await;
        head.push(byte.expect("closed during the handshake"));
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "not upgraded: {}",
        String::from_utf8_lossy(&head)
    );
}

/// Sets the rules of Redis's `default` user (`ACL SETUSER default RULES…`) on `admin`.
pub async fn acl(admin: &mut redis::aio::MultiplexedConnection, rules: &[&str]) {
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("default")
        .arg(rules)
        .query_async(admin)
        .await
        .unwrap();
}

/// The offsets of the messages in a `history` reply, in the order given.
pub fn message_offsets(reply: &Value) -> Vec<u64> {
    reply["messages"]
        .as_array()
        .unwrap_or_else(|| panic!("no messages in {reply}"))
        .iter()
        .map(|m| m["offset"].as_u64().unwrap())
        .collect()
}

/// `CLIENT KILL TYPE {kind} SKIPME yes` on `admin`: how many connections of that kind
/// ("pubsub", "normal") Redis closed.
pub async fn kill_clients(admin: &mut redis::aio::MultiplexedConnection, kind: &str) -> i64 {
    redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg(kind)
        .arg("SKIPME")
        .arg("yes")
        .query_async(admin)
        .await
        .expect("CLIENT KILL")
}

/// Puts into `room`'s presence (default key prefix) a member that thinws did not write:
/// not a JSON string, as another writer of the same keys might leave.
pub async fn plant_unreadable_presence_member(redis: &RedisServer, room: &str) {
    let _: () = redis::cmd("HSET")
        .arg(format!("thinws:presence:{{{room}}}"))
        .arg("not json")
        .arg(1)
        .query_async(&mut redis.client().await)
        .await
        .unwrap();
}

/// A private directory under the system's temp directory, removed with everything in it on
/// drop (a test that fails leaves nothing behind either).
pub struct TempDir(std::path::PathBuf);

impl TempDir {
    /// A new empty directory whose name starts with `thinws-{label}-`.
    pub fn new(label: &str) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "thinws-{label}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }

    /// The path of `name` in this directory.
    pub fn join(&self, name: &str) -> std::path::PathBuf {
        self.0.join(name)
    }

    /// Writes `contents` to the file `name` in this directory; returns its path.
    pub fn file(&self, name: &str, contents: impl AsRef<[u8]>) -> std::path::PathBuf {
        let path = self.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A loopback port free now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Waits until something listens on the loopback `port`.
pub async fn listening(port: u16) {
    until(&format!("port {port} to listen"), async || {
        TcpStream::connect(("127.0.0.1", port)).await.is_ok()
    })
    .await
}

/// The inner service under the layer in tests: answers every request with `inner {path}`.
#[derive(Clone)]
pub struct Inner;

impl<B> tower::Service<Request<B>> for Inner {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let body = format!("inner {}", request.uri().path());
        std::future::ready(Ok(Response::new(Full::new(Bytes::from(body)))))
    }
}

/// A node served by plain hyper 1 (`serve_connection(..).with_upgrades()`) on a loopback
/// port; the server task stops on drop.
pub struct Node {
    pub addr: SocketAddr,
    pub hub: Hub,
    task: tokio::task::JoinHandle<()>,
}

impl Node {
    /// Serves `layer` around [`Inner`].
    pub async fn start(layer: ThinWsLayer) -> Self {
        Self::start_on("127.0.0.1:0".parse().unwrap(), layer).await
    }

    /// Serves `layer` on `addr` (retrying while the port is still held by a node that was
    /// just stopped).
    pub async fn start_on(addr: SocketAddr, layer: ThinWsLayer) -> Self {
        let listener = eventually("the port to be free", DEADLINE, async || {
            TcpListener::bind(addr).await.ok()
        })
        .await;
        let addr = listener.local_addr().unwrap();
        let hub = layer.hub();
        let service = layer.layer(Inner);
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let service = TowerToHyperService::new(service.clone());
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .with_upgrades()
                        .await;
                });
            }
        });
        Node { addr, hub, task }
    }

    /// A node on the private Redis.
    pub async fn redis(redis: &RedisServer) -> Self {
        Self::start(ThinWsLayer::new(redis.url())).await
    }

    /// `ws://{addr}/`.
    pub fn url(&self) -> String {
        format!("ws://{}/", self.addr)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A real WebSocket client over TCP.
pub struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// Frames received while waiting for something else.
    backlog: VecDeque<Value>,
    next_id: u64,
}

impl Client {
    pub async fn connect(url: &str) -> Self {
        let (ws, response) = within("WebSocket handshake", tokio_tungstenite::connect_async(url))
            .await
            .unwrap_or_else(|e| panic!("WebSocket handshake with {url} failed: {e}"));
        assert_eq!(response.status(), 101);
        Client {
            ws,
            backlog: VecDeque::new(),
            next_id: 1,
        }
    }

    /// Wraps an already connected WebSocket.
    pub fn from_stream(ws: WebSocketStream<MaybeTlsStream<TcpStream>>) -> Self {
        Client {
            ws,
            backlog: VecDeque::new(),
            next_id: 1,
        }
    }

    /// Connects to the node at `addr` over a TCP connection whose receive buffer is
    /// `bytes` (a client that reads slowly, or not at all, backs the node's writes up
    /// soon).
    pub async fn connect_with_receive_buffer(url: &str, addr: SocketAddr, bytes: u32) -> Self {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(bytes).unwrap();
        let tcp = socket.connect(addr).await.unwrap();
        let (ws, _) = tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(tcp))
            .await
            .unwrap();
        Self::from_stream(ws)
    }

    /// Connects and binds `connection_id`.
    pub async fn connect_as(url: &str, connection_id: &str) -> Self {
        let mut client = Self::connect(url).await;
        let reply = client
            .request(json!({"type": "connect", "connectionID": connection_id}))
            .await;
        assert_eq!(reply["type"], "ack", "connect: {reply}");
        client
    }

    pub async fn send_text(&mut self, text: impl Into<String>) {
        let text: String = text.into();
        within("send", self.ws.send(Message::text(text)))
            .await
            .expect("send");
    }

    pub async fn send_message(&mut self, message: Message) {
        within("send", self.ws.send(message)).await.expect("send");
    }

    /// The next JSON frame from the server (the backlog first).
    pub async fn recv(&mut self) -> Value {
        if let Some(v) = self.backlog.pop_front() {
            return v;
        }
        self.read().await
    }

    /// The next text frame as the server sent it, byte for byte.
    pub async fn recv_text(&mut self) -> String {
        loop {
            let message = within("a frame from the server", self.ws.next())
                .await
                .expect("socket closed while a frame was expected")
                .expect("socket error while a frame was expected");
            if let Message::Text(text) = message {
                return text.to_string();
            }
        }
    }

    async fn read(&mut self) -> Value {
        loop {
            let message = within("a frame from the server", self.ws.next())
                .await
                .expect("socket closed while a frame was expected")
                .expect("socket error while a frame was expected");
            match message {
                Message::Text(text) => {
                    return serde_json::from_str(&text)
                        .unwrap_or_else(|e| panic!("server sent invalid JSON {text:?}: {e}"))
                }
                Message::Close(frame) => {
                    panic!("socket closed ({frame:?}) while a frame was expected")
                }
                _ => continue,
            }
        }
    }

    /// Sends `frame` with a fresh numeric `messageID` and returns the `ack` or `error` that
    /// echoes it; deliveries that arrive meanwhile are kept for [`Client::recv`].
    pub async fn request(&mut self, mut frame: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        frame["messageID"] = json!(id);
        self.send_text(frame.to_string()).await;
        self.reply_to(&json!(id)).await
    }

    /// Waits for the `ack` or `error` echoing `id`.
    pub async fn reply_to(&mut self, id: &Value) -> Value {
        loop {
            let v = self.read().await;
            if (v["type"] == "ack" || v["type"] == "error") && v["messageID"] == *id {
                return v;
            }
            self.backlog.push_back(v);
        }
    }

    pub async fn subscribe(&mut self, room: &str) {
        let reply = self
            .request(json!({"type": "subscribe", "roomID": room}))
            .await;
        assert_eq!(reply["type"], "ack", "subscribe {room}: {reply}");
    }

    pub async fn unsubscribe(&mut self, room: &str) {
        let reply = self
            .request(json!({"type": "unsubscribe", "roomID": room}))
            .await;
        assert_eq!(reply["type"], "ack", "unsubscribe {room}: {reply}");
    }

    pub async fn publish(&mut self, room: &str, payload: Value) {
        let reply = self
            .request(json!({"type": "message", "roomID": room, "payload": payload}))
            .await;
        assert_eq!(reply["type"], "ack", "message to {room}: {reply}");
    }

    /// The next delivered `message` frame.
    pub async fn delivery(&mut self) -> Value {
        let v = self.recv().await;
        assert_eq!(v["type"], "message", "expected a delivery, got {v}");
        v
    }

    /// Waits for the server to close the socket and returns the close code.
    pub async fn closed(&mut self) -> CloseCode {
        self.texts_until_closed().await.1
    }

    /// Reads until the server closes the socket: how many text frames came first (the
    /// backlog included), and the close code.
    pub async fn texts_until_closed(&mut self) -> (usize, CloseCode) {
        let (texts, code) = self.frames_until_closed().await;
        (texts.len(), code)
    }

    /// Reads until the server closes the socket: the frames that came first, parsed (the
    /// backlog first), and the close code.
    pub async fn frames_until_closed(&mut self) -> (Vec<Value>, CloseCode) {
        let mut frames: Vec<Value> = self.backlog.drain(..).collect();
        loop {
            match within("the server to close the socket", self.ws.next()).await {
                Some(Ok(Message::Text(text))) => frames.push(serde_json::from_str(&text).unwrap()),
                Some(Ok(Message::Close(frame))) => {
                    return (frames, frame.map_or(CloseCode::Status, |f| f.code))
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => panic!("socket error before a close frame: {e}"),
                None => panic!("socket ended without a close frame"),
            }
        }
    }

    /// Sends a close frame and reads nothing (a client that stopped reading).
    pub async fn send_close(&mut self) {
        self.ws.close(None).await.expect("the close frame was sent");
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
        // Wait until the server has seen it (its close reply or the end of the stream).
        let _ = tokio::time::timeout(DEADLINE, async {
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
    }
}

/// Waits until `hub` reports `n` members in `room` (socket cleanup is asynchronous).
pub async fn members(hub: &Hub, room: &str, n: usize) {
    until(&format!("{n} members in {room}"), async || {
        hub.member_count(room) == n
    })
    .await
}

/// A raw HTTP/1.1 request over TCP (`Connection: close`); returns the status and the body.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let mut tcp = within("HTTP connect", TcpStream::connect(addr))
        .await
        .unwrap();
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    within("HTTP response", tcp.read_to_end(&mut response))
        .await
        .unwrap();
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Sends `signal` (`-STOP`, `-CONT`) to a running server's process.
pub fn send_signal(child: Option<&std::process::Child>, signal: &str) {
    let pid = child.map(|c| c.id()).expect("a running server");
    let status = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill {signal} {pid}");
}

//! End to end in a real browser: the demo chat page of two `thinws` servers on one private
//! Redis, driven in headless Chromium (Debian's `chromium`) by `tests/browser/e2e.mjs`
//! with `playwright-core`. Set `THINWS_SCREENSHOT=path.png` to keep a screenshot.

mod support;

#[path = "support/binary.rs"]
mod binary;

use std::process::Command;
use std::time::Duration;

use binary::Server;
use serde_json::json;
use support::RedisServer;

/// A `thinws` server on `redis` with `extra` arguments, and its page's address.
async fn start(redis: &RedisServer, extra: &[&str]) -> (Server, String) {
    let url = redis.url();
    let args: Vec<&str> = ["--redis-url", url.as_str()]
        .iter()
        .chain(extra)
        .copied()
        .collect();
    let server = Server::start(&args).await;
    let page = format!("http://{}/", server.addr);
    (server, page)
}

/// A WebSocket server that plays a misbehaving ThinWS server, for what thinws.js must
/// survive that no thinws node does; its address. What a connection gets depends on the
/// URL's path:
/// - `/unknown`: every request but `connect` is answered first by a frame of a type the
///   client does not know that carries the request's `messageID`, then by its ack (marked
///   `"real": true`);
/// - `/long`: the `connect` ack says the token lasts 3,000,000 s (34 days, past what
///   `setTimeout` takes), a `refresh` is acked the same way, and other requests are acked
///   with how many `refresh` frames the connection got;
/// - `/throwing`: after its `connect` ack, a connection gets a message in room `r`; the
///   first connection is then closed;
/// - `/slow`: the first connection is closed once open; on later ones, requests other than
///   `connect` are acked with how many `connect` frames the connection got.
async fn scripted_server() -> String {
    use futures_util::{SinkExt, StreamExt};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio_tungstenite::tungstenite::Message;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new([(); 4].map(|_| AtomicUsize::new(0)));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let connections = connections.clone();
            tokio::spawn(async move {
                let mut path = String::new();
                // The handshake's callback type is tungstenite's, large error and all.
                #[allow(clippy::result_large_err)]
                let take_path = |request: &http::Request<()>, response| {
                    path = request.uri().path().to_owned();
                    Ok(response)
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tcp, take_path).await else {
                    return;
                };
                let scenarios = ["/unknown", "/long", "/throwing", "/slow"];
                let Some(scenario) = scenarios.iter().position(|s| *s == path) else {
                    return;
                };
                let nth = connections[scenario].fetch_add(1, Ordering::SeqCst) + 1;
                if path == "/slow" && nth == 1 {
                    let _ = ws.close(None).await;
                    return;
                }
                let (mut refreshes, mut connects) = (0, 0);
                while let Some(Ok(message)) = ws.next().await {
                    let Message::Text(text) = message else {
                        continue;
                    };
                    let frame: serde_json::Value = serde_json::from_str(&text).unwrap();
                    let id = frame["messageID"].clone();
                    let mut replies = Vec::new();
                    match (path.as_str(), frame["type"].as_str().unwrap_or("")) {
                        ("/long", "connect" | "refresh") => {
                            refreshes += usize::from(frame["type"] == "refresh");
                            replies.push(
                                json!({"type": "ack", "messageID": id, "expiresIn": 3_000_000}),
                            );
                        }
                        ("/long", _) => replies
                            .push(json!({"type": "ack", "messageID": id, "refreshes": refreshes})),
                        ("/throwing", "connect") => {
                            replies.push(json!({"type": "ack", "messageID": id}));
                            replies.push(json!({"type": "message", "roomID": "r",
                                "connectionID": "server", "payload": nth}));
                        }
                        ("/slow", "connect") => {
                            connects += 1;
                            replies.push(json!({"type": "ack", "messageID": id}));
                        }
                        ("/slow", _) => replies
                            .push(json!({"type": "ack", "messageID": id, "connects": connects})),
                        ("/unknown", "connect") => {
                            replies.push(json!({"type": "ack", "messageID": id}))
                        }
                        ("/unknown", _) => {
                            replies.push(json!({"type": "mystery", "messageID": id}));
                            replies.push(json!({"type": "ack", "messageID": id, "real": true}));
                        }
                        _ => replies.push(json!({"type": "ack", "messageID": id})),
                    }
                    for reply in replies {
                        if ws.send(Message::text(reply.to_string())).await.is_err() {
                            return;
                        }
                    }
                    if path == "/throwing" && nth == 1 {
                        let _ = ws.close(None).await;
                        return;
                    }
                }
            });
        }
    });
    format!("ws://{addr}")
}

/// The token node's HS256 secret (the page signs its own short-lived tokens with it).
const SECRET: &str = "browser-secret-of-at-least-32-bytes";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_browser_pages_on_two_nodes_chat_through_the_demo() {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        std::path::Path::new(&chromium).exists(),
        "headless Chromium is needed at {chromium} (apt-get install chromium; scripts/test does it)"
    );
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    if !dir.join("node_modules/playwright-core").exists() {
        let status = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .status()
            .expect("npm is needed to install playwright-core");
        assert!(status.success(), "npm ci failed in {}", dir.display());
    }
    let redis = RedisServer::start().await;
    let demo = ["--history-size", "100", "--join-leave"];
    let (a, url_a) = start(&redis, &demo).await;
    let (_b, url_b) = start(&redis, &demo).await;
    // A third node requires tokens (and lets node A's pages in): thinws.js gets one from
    // its `token` option.
    let origin_a = url_a.trim_end_matches('/');
    let (_c, url_c) = start(
        &redis,
        &["--token-secret", SECRET, "--allowed-origin", origin_a],
    )
    .await;
    // A node that takes frames of 1 KiB at most, with history in every room.
    let (_small, url_small) = start(
        &redis,
        &[
            "--max-frame-size",
            "1024",
            "--history-size",
            "10",
            "--allowed-origin",
            origin_a,
        ],
    )
    .await;
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 300;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &serde_json::json!({"sub": "cat", "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let mut node = tokio::process::Command::new("node");
    // Killed (with the Chromium it drives) if the test gives up.
    node.kill_on_drop(true);
    node.arg(dir.join("e2e.mjs")).arg(&url_a).arg(&url_b);
    // Node A, which the script kills mid-typing (while Redis is frozen, so that lines sent
    // then are published without an ack) and starts again on its address.
    let node_a = serde_json::json!({
        "pid": a.child.id(),
        "redis_pid": redis.pid(),
        "command": [binary::BIN, "--listen", a.addr.to_string(), "--redis-url", redis.url(),
            "--history-size", "100", "--join-leave"],
    });
    node.env("THINWS_NODE_A", node_a.to_string());
    node.env("THINWS_SMALL_NODE", &url_small);
    node.env("THINWS_SCRIPTED", scripted_server().await);
    node.env("THINWS_TOKEN_NODE", &url_c)
        .env("THINWS_TOKEN", &token)
        .env("THINWS_TOKEN_SECRET", SECRET)
        .env("THINWS_REDIS_PORT", redis.port.to_string());
    if let Ok(path) = std::env::var("THINWS_SCREENSHOT") {
        node.arg(path);
    }
    let output = tokio::time::timeout(Duration::from_secs(120), node.output())
        .await
        .expect("the browser test took over 2 minutes")
        .expect("node is needed to drive the browser");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "browser test failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("ok: two pages on two nodes exchanged messages"),
        "{stdout}"
    );
    assert!(
        stdout.contains("ok: thinws.js connected with a token"),
        "{stdout}"
    );
    assert!(
        stdout.contains("ok: thinws.js refreshed its token without dropping the socket"),
        "{stdout}"
    );
    assert!(
        stdout.contains("ok: thinws.js reports gaps and rejoins a room Redis lost"),
        "{stdout}"
    );
    assert!(
        stdout.contains("ok: the compatibility client works as the original's README shows"),
        "{stdout}"
    );
    assert!(
        stdout.contains("ok: a late joiner saw the room's history"),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "ok: the demo survives a node kill mid-typing without a lost or doubled line"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("ok: the member list follows joins and leaves on the other node"),
        "{stdout}"
    );
    assert!(
        stdout.contains("ok: a request made while disconnected times out"),
        "{stdout}"
    );
    assert!(
        stdout.contains("ok: thinws.js gives up positions too large for a connect, with a gap"),
        "{stdout}"
    );
    for survived in [
        "a frame of an unknown type is not taken for an answer",
        "a token lasting weeks is not refreshed in a loop",
        "callbacks that throw stop neither deliveries nor reconnection",
        "a slow token for a replaced socket sends no second connect",
    ] {
        assert!(
            stdout.contains(&format!("ok: thinws.js: {survived}")),
            "{stdout}"
        );
    }
}

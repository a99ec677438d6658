//! End to end in a real browser: the demo chat page of two `thinws` servers on one private
//! Redis, driven in headless Chromium (Debian's `chromium`) by `tests/browser/e2e.mjs`
//! with `playwright-core`. Set `THINWS_SCREENSHOT=path.png` to keep a screenshot.

mod support;

#[path = "support/binary.rs"]
mod binary;

use std::process::Command;
use std::time::Duration;

use binary::Server;
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
}

//! The standalone `thinws` binary: start-up, health, a two-process cluster, shutdown.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;
use support::certs::key_pair;
use support::{http, within, Client, RedisServer};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

#[path = "support/binary.rs"]
mod binary;

use binary::{hs256, http_raw, http_with_body, now, Server, BIN, SECRET};

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

/// A second signal cuts a drain short; the sockets left are closed with 1001.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_cuts_the_drain_short() {
    let server = Server::start(&["--drain-seconds", "60", "--no-demo"]).await;
    let mut c = Client::connect(&server.url()).await;
    c.subscribe("r").await;
    server.terminate();
    let addr = server.addr;
    support::until("/healthz to say 503 while the node drains", async || {
        http(addr, "GET", "/healthz", &[]).await.0 == 503
    })
    .await;
    server.terminate();
    assert_eq!(c.closed().await, CloseCode::Away);
    assert!(server.exited().await.success());
}

/// Values that cannot work refuse to start, with the flag named, rather than serving a
/// node that drops every quiet socket, refuses every upgrade or panics on its clock.
#[tokio::test]
async fn nonsense_flags_exit_non_zero_naming_the_flag() {
    for (args, flag) in [
        (&["--idle-timeout", "20"][..], "--idle-timeout"),
        (&["--ping-interval", "0"][..], "--ping-interval"),
        (&["--ping-interval", "60"][..], "--idle-timeout"),
        (
            &["--shutdown-timeout", "18446744073709551615"][..],
            "--shutdown-timeout",
        ),
        (
            &["--auth-grace", "18446744073709551615"][..],
            "--auth-grace",
        ),
        (&["--max-sockets", "0"][..], "--max-sockets"),
        (&["--max-frame-size", "0"][..], "--max-frame-size"),
        (&["--path", "ws"][..], "--path"),
        (&["--identity-ttl", "0"][..], "--identity-ttl"),
        (&["--presence-ttl", "0"][..], "--presence-ttl"),
        (&["--rate-burst", "0"][..], "--rate-burst"),
        (
            &[
                "--redis-cluster-url",
                "redis://127.0.0.1:1",
                "--key-prefix",
                "{app}:",
            ][..],
            "--key-prefix",
        ),
    ] {
        let output = Command::new(BIN)
            .args(["--listen", "127.0.0.1:0", "--no-demo"])
            .args(args)
            .output()
            .unwrap();
        assert!(!output.status.success(), "{args:?}");
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert!(
            stderr.starts_with("thinws: ") && stderr.contains(flag),
            "{args:?}: {stderr}"
        );
    }
    // Boolean variables take what people write (`1`, `yes`): parsed, they let the run go
    // on to the check above.
    let output = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--max-sockets", "0"])
        .env("THINWS_NO_DEMO", "1")
        .env("THINWS_PRESENCE", "yes")
        .output()
        .unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.starts_with("thinws: --max-sockets"), "{stderr}");
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

/// Frames in are counted on their socket and added to the shared counter when it writes;
/// a socket closed for flooding writes its last answers on its way out, and its count
/// still arrives whole, with no other socket to write after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_socket_has_every_frame_it_sent_counted() {
    let server = Server::start(&["--rate-limit", "1", "--rate-burst", "1"]).await;
    let mut a = Client::connect(&server.url()).await;
    for id in 0..150 {
        let frame = json!({"type": "subscribe", "messageID": id, "roomID": "r"});
        a.send_text(frame.to_string()).await;
    }
    // Every frame the node read is answered before the close.
    let (answered, code) = a.texts_until_closed().await;
    assert_eq!(code, CloseCode::Policy);
    assert!(answered > 100, "{answered} answers");
    let expected = format!("thinws_frames_in_total {answered}\n");
    support::until("every frame read to be counted", async || {
        let body = http(server.addr, "GET", "/metrics", &[]).await.1;
        body.contains("thinws_sockets 0") && body.contains(&expected)
    })
    .await;
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

/// Reads until the server closes the connection; returns how long that took.
async fn until_closed(tcp: &mut tokio::net::TcpStream, dripping: bool) -> Duration {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let started = std::time::Instant::now();
    let mut buf = [0u8; 256];
    loop {
        tokio::select! {
            read = tcp.read(&mut buf) => match read {
                Ok(0) | Err(_) => return started.elapsed(),
                Ok(_) => {}
            },
            () = tokio::time::sleep(Duration::from_millis(300)), if dripping => {
                // One more byte of a request head that never ends.
                if tcp.write_all(b"x").await.is_err() {
                    return started.elapsed();
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_are_closed_after_the_header_read_timeout() {
    use tokio::io::AsyncWriteExt;
    let server = Server::start(&["--header-read-timeout", "1"]).await;
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let addr = server.addr;
        tasks.push(tokio::spawn(async move {
            let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            tcp.write_all(b"GET / HTTP/1.1\r\nX-Slow: ").await.unwrap();
            until_closed(&mut tcp, true).await
        }));
    }
    for task in tasks {
        let took = within("a slow head to be cut off", task).await.unwrap();
        assert!(took < Duration::from_secs(5), "closed after {took:?}");
    }
    // The node still serves.
    assert_eq!(http(server.addr, "GET", "/healthz", &[]).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_have_not_upgraded_are_limited() {
    let server = Server::start(&[
        "--max-pending-connections",
        "4",
        "--header-read-timeout",
        "2",
    ])
    .await;
    // Four connections that say nothing hold every pending place.
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(tokio::net::TcpStream::connect(server.addr).await.unwrap());
    }
    // No wait needed: the kernel hands connections to the accept loop in the order they
    // were made, so the four are taken (and hold the places) before the probe below.
    let started = std::time::Instant::now();
    let (status, _) = http(server.addr, "GET", "/healthz", &[]).await;
    let waited = started.elapsed();
    assert_eq!(status, 200);
    assert!(
        waited >= Duration::from_millis(800),
        "the fifth connection waited for a place ({waited:?})"
    );
    // The silent ones were cut off by the head timeout, which freed their places.
    for mut tcp in idle {
        assert!(until_closed(&mut tcp, false).await < Duration::from_secs(3));
    }
}

/// CPU seconds (user + system) the process has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_open_file_limit_upgrades_get_503_and_nothing_spins() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let dir = support::TempDir::new("fd");
    let log = dir.join("stderr.log");
    // 160 open files at most (soft and hard): 40 pending places, 160 - 40 - 64 = 56 sockets.
    let child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -n 160 && exec {BIN} --listen {addr} --no-demo --max-sockets 100000 2>{}",
            log.display()
        ))
        .env_remove("REDIS_URL")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let server = Server::adopt(child, addr);
    support::until("the server to listen", async || {
        tokio::net::TcpStream::connect(addr).await.is_ok()
    })
    .await;
    let (mut open, mut refused) = (Vec::new(), 0);
    for _ in 0..120 {
        match tokio_tungstenite::connect_async(server.url()).await {
            // The 503 is decided on the count of registered sockets, and a socket registers
            // after its 101: a request answered means this one counts before the next comes.
            Ok((ws, _)) => {
                let mut client = Client::from_stream(ws);
                client.subscribe("fd").await;
                open.push(client);
            }
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), 503);
                refused += 1;
            }
            Err(e) => panic!("neither a socket nor a 503: {e}"),
        }
    }
    assert_eq!(open.len(), 56, "the socket limit fits the open-file limit");
    assert_eq!(refused, 64);
    // Full, but not spinning: health answers, and the process is nearly idle.
    let before = cpu_seconds(server.child.id());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(http(addr, "GET", "/healthz", &[]).await.0, 200);
    let used = cpu_seconds(server.child.id()) - before;
    assert!(used < 0.3, "{used} CPU seconds in a second while full");
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(log_text.matches("accept failed").count(), 0, "{log_text}");
    drop(open);
}

#[tokio::test]
async fn the_server_allows_its_own_origin_and_the_listed_ones() {
    let server = Server::start(&["--allowed-origin", "https://app.example"]).await;
    let own = format!("http://{}", server.addr);
    for (origin, allowed) in [
        (own.as_str(), true),
        ("https://app.example", true),
        ("https://evil.example", false),
        ("http://127.0.0.1:1", false),
    ] {
        let mut request =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
                server.url(),
            )
            .unwrap();
        request
            .headers_mut()
            .insert("Origin", origin.parse().unwrap());
        match tokio_tungstenite::connect_async(request).await {
            Ok(_) => assert!(allowed, "{origin} got a socket"),
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert!(!allowed, "{origin} was refused");
                assert_eq!(response.status(), 403);
            }
            Err(e) => panic!("{origin}: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_secret_only_signed_tokens_get_in_and_their_claims_hold() {
    let server = Server::start(&["--token-secret", SECRET, "--auth-grace", "1"]).await;
    let token = hs256(
        SECRET,
        json!({"sub": "alice", "exp": now() + 60, "rooms": ["chat:*"]}),
    );

    // In the connect frame: the identity is the token's, whatever the frame claims.
    let mut alice = Client::connect(&server.url()).await;
    let reply = alice
        .request(json!({"type": "connect", "connectionID": "mallory", "token": token}))
        .await;
    assert_eq!(reply["type"], "ack", "{reply}");
    alice.subscribe("chat:1").await;
    let refused = alice
        .request(json!({"type": "subscribe", "roomID": "admin"}))
        .await;
    assert_eq!(refused["code"], "forbidden", "{refused}");
    let refused = alice
        .request(json!({"type": "message", "roomID": "admin", "payload": 1}))
        .await;
    assert_eq!(refused["code"], "forbidden", "{refused}");
    alice.publish("chat:1", json!("hi")).await;
    assert_eq!(alice.delivery().await["connectionID"], "alice");

    // As `?token=` on the upgrade URL.
    let mut by_url = Client::connect(&format!("{}?token={token}", server.url())).await;
    let reply = by_url
        .request(json!({"type": "connect", "connectionID": "x"}))
        .await;
    assert_eq!(reply["type"], "ack", "{reply}");

    // Without a valid token: forbidden everywhere, then closed with 1008.
    let expired = hs256(SECRET, json!({"sub": "alice", "exp": now() - 120}));
    let forged = hs256("guess", json!({"sub": "alice", "exp": now() + 60}));
    for (what, token) in [
        ("none", None),
        ("expired", Some(expired)),
        ("forged", Some(forged)),
    ] {
        let mut eve = Client::connect(&server.url()).await;
        let mut connect = json!({"type": "connect", "connectionID": "alice"});
        if let Some(token) = token {
            connect["token"] = json!(token);
        }
        let reply = eve.request(connect).await;
        assert_eq!(reply["code"], "forbidden", "{what}: {reply}");
        for frame in [
            json!({"type": "subscribe", "roomID": "chat:1"}),
            json!({"type": "message", "roomID": "chat:1", "payload": "spoof"}),
            json!({"type": "unsubscribe", "roomID": "chat:1"}),
        ] {
            let reply = eve.request(frame).await;
            assert_eq!(reply["code"], "forbidden", "{what}: {reply}");
        }
        assert_eq!(eve.closed().await, CloseCode::Policy, "{what}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn es256_and_rs256_tokens_are_checked_with_a_public_key() {
    let dir = support::TempDir::new("es256");
    let (pkcs8, public) = key_pair(&dir, "EC", "ec_paramgen_curve:P-256");
    let server = Server::start(&["--token-public-key", public.to_str().unwrap()]).await;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
        &json!({"sub": "bob", "exp": now() + 60}),
        &jsonwebtoken::EncodingKey::from_ec_pem(&std::fs::read(&pkcs8).unwrap()).unwrap(),
    )
    .unwrap();
    let mut bob = Client::connect(&server.url()).await;
    let reply = bob
        .request(json!({"type": "connect", "connectionID": "bob", "token": token}))
        .await;
    assert_eq!(reply["type"], "ack", "{reply}");
    bob.subscribe("anything").await;
    // An HS256 token signed with the public key's text (the classic confusion) is refused.
    let confused = hs256(
        &std::fs::read_to_string(&public).unwrap(),
        json!({"sub": "bob", "exp": now() + 60}),
    );
    let mut eve = Client::connect(&server.url()).await;
    let reply = eve
        .request(json!({"type": "connect", "connectionID": "bob", "token": confused}))
        .await;
    assert_eq!(reply["code"], "forbidden", "{reply}");

    // RS256 with an RSA key pair.
    let (rsa, rsa_public) = key_pair(&dir, "RSA", "rsa_keygen_bits:2048");
    let server = Server::start(&["--token-public-key", rsa_public.to_str().unwrap()]).await;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
        &json!({"sub": "rita", "exp": now() + 60}),
        &jsonwebtoken::EncodingKey::from_rsa_pem(&std::fs::read(&rsa).unwrap()).unwrap(),
    )
    .unwrap();
    let mut rita = Client::connect(&server.url()).await;
    let reply = rita
        .request(json!({"type": "connect", "connectionID": "x", "token": token}))
        .await;
    assert_eq!(reply["type"], "ack", "{reply}");
}

/// An HTTP request with a body; the status and the body of the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_publish_through_the_http_api_with_an_api_key() {
    let mut redis = RedisServer::start().await;
    let server =
        Server::start(&["--redis-url", &redis.url(), "--api-key", "k3y", "--no-demo"]).await;
    let mut subscriber = Client::connect(&server.url()).await;
    subscriber.subscribe("news room").await;
    let key = [("Authorization", "apikey k3y")];
    let (status, body) = http_with_body(
        server.addr,
        "POST",
        "/api/publish",
        &key,
        r#"{"roomID":"news room","payload":{"headline":"hi"}}"#,
    )
    .await;
    assert_eq!((status, &body), (200, &json!({"ok": true})));
    let got = subscriber.delivery().await;
    assert_eq!(got["payload"], json!({"headline": "hi"}));
    assert_eq!(got["connectionID"], "server");

    let (status, body) =
        http_with_body(server.addr, "GET", "/api/rooms/news%20room", &key, "").await;
    assert_eq!(
        (status, &body),
        (200, &json!({"roomID": "news room", "localMembers": 1}))
    );

    // A wrong or missing key, bad input: refused, nothing published.
    for headers in [&[][..], &[("Authorization", "apikey wrong")][..]] {
        let (status, head, _) = http_raw(
            server.addr,
            "POST",
            "/api/publish",
            headers,
            r#"{"roomID":"news room","payload":1}"#,
        )
        .await;
        assert_eq!(status, 401);
        assert!(
            head.to_ascii_lowercase()
                .contains("\r\nwww-authenticate: apikey"),
            "{head}"
        );
    }
    // Not JSON, or JSON of another shape.
    for (body, code) in [
        (r#"{"roomID":"news room","payload":"#, "invalid_json"),
        (r#"{"roomID":"news room""#, "invalid_json"),
        (r#"{"roomID":"news room"}"#, "invalid_message"),
        (r#"["news room", 1]"#, "invalid_message"),
    ] {
        let (status, answer) =
            http_with_body(server.addr, "POST", "/api/publish", &key, body).await;
        assert_eq!(
            (status, answer["error"].as_str()),
            (400, Some(code)),
            "{body}"
        );
    }
    let (status, body) = http_with_body(
        server.addr,
        "POST",
        "/api/publish",
        &key,
        r#"{"roomID":"news room","payload":"\ud800"}"#,
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_json"))
    );

    // Redis down: unavailable (nothing sent), not an ok.
    redis.kill();
    let (status, body) = http_with_body(
        server.addr,
        "POST",
        "/api/publish",
        &key,
        r#"{"roomID":"news room","payload":2}"#,
    )
    .await;
    assert!(status == 503 || status == 504, "{status} {body}");
    assert!(
        body["error"] == "unavailable" || body["error"] == "timeout",
        "{body}"
    );
}

/// `POST /api/publish` with an idempotency key (in the body or the `Idempotency-Key`
/// header): a resend is answered `duplicate` and delivered to nobody.
#[tokio::test]
async fn the_api_publishes_a_key_once() {
    let server = Server::start(&["--api-key", "k", "--history-size", "10"]).await;
    let mut subscriber = Client::connect(&server.url()).await;
    subscriber.subscribe("orders").await;
    const KEY: &[(&str, &str)] = &[("Authorization", "apikey k")];
    const WITH_HEADER: &[(&str, &str)] =
        &[("Authorization", "apikey k"), ("Idempotency-Key", "o-17")];
    let (key, with_header) = (KEY, WITH_HEADER);
    let publish = |headers: &'static [(&'static str, &'static str)], body: &'static str| {
        http_with_body(server.addr, "POST", "/api/publish", headers, body)
    };
    let body = r#"{"roomID":"orders","payload":17,"idempotencyKey":"o-17"}"#;
    let (status, first) = publish(key, body).await;
    assert_eq!((status, &first), (200, &json!({"ok": true})));
    let (status, again) = publish(key, body).await;
    assert_eq!(
        (status, &again),
        (200, &json!({"ok": true, "duplicate": true}))
    );
    // The header names the same key.
    let (status, again) = publish(with_header, r#"{"roomID":"orders","payload":17}"#).await;
    assert_eq!(
        (status, &again),
        (200, &json!({"ok": true, "duplicate": true}))
    );
    // Differing keys, or a key too long: refused, nothing published.
    let (status, refused) = publish(
        with_header,
        r#"{"roomID":"orders","payload":1,"idempotencyKey":"other"}"#,
    )
    .await;
    assert_eq!(
        (status, refused["error"].as_str()),
        (400, Some("invalid_message"))
    );
    let too_long = format!(
        r#"{{"roomID":"orders","payload":1,"idempotencyKey":"{}"}}"#,
        "k".repeat(65)
    );
    let (status, refused) =
        http_with_body(server.addr, "POST", "/api/publish", key, &too_long).await;
    assert_eq!(
        (status, refused["error"].as_str()),
        (400, Some("invalid_message"))
    );
    let (status, _) = publish(key, r#"{"roomID":"orders","payload":"marker"}"#).await;
    assert_eq!(status, 200);
    let first = subscriber.delivery().await;
    assert_eq!(
        (&first["payload"], &first["offset"]),
        (&json!(17), &json!(1))
    );
    let next = subscriber.delivery().await;
    assert_eq!(
        (&next["payload"], &next["offset"]),
        (&json!("marker"), &json!(2))
    );
}

#[tokio::test]
async fn without_an_api_key_the_api_is_off() {
    let server = Server::start(&[]).await;
    let (status, body) = http_with_body(
        server.addr,
        "POST",
        "/api/publish",
        &[],
        r#"{"roomID":"r","payload":1}"#,
    )
    .await;
    assert_eq!((status, body["error"].as_str()), (404, Some("not_enabled")));
}

#[tokio::test]
async fn the_api_serves_a_rooms_history() {
    let server = Server::start(&["--api-key", "k", "--history-size", "10"]).await;
    let key = [("Authorization", "apikey k")];
    for n in 1..=3 {
        let (status, _) = http_with_body(
            server.addr,
            "POST",
            "/api/publish",
            &key,
            &format!(r#"{{"roomID":"news","payload":{n}}}"#),
        )
        .await;
        assert_eq!(status, 200);
    }
    let (status, body) = http_with_body(
        server.addr,
        "GET",
        "/api/rooms/news/history?limit=2",
        &key,
        "",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["offset"], 3);
    let payloads: Vec<_> = body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["payload"].clone())
        .collect();
    assert_eq!(payloads, [json!(2), json!(3)]);
    // Messages as they were delivered, byte for byte: key order and numbers kept.
    let payload = r#"{"b":1,"a":2e2,"big":123456789012345678901234567890}"#;
    let (status, _) = http_with_body(
        server.addr,
        "POST",
        "/api/publish",
        &key,
        &format!(r#"{{"roomID":"news","payload":{payload}}}"#),
    )
    .await;
    assert_eq!(status, 200);
    let (status, _, body) = http_raw(
        server.addr,
        "GET",
        "/api/rooms/news/history?limit=1",
        &key,
        "",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(&format!(r#""payload":{payload}"#)), "{body}");
    // A limit that is not a number is refused, not ignored.
    for query in ["limit=abc", "limit=-1"] {
        let path = format!("/api/rooms/news/history?{query}");
        let (status, body) = http_with_body(server.addr, "GET", &path, &key, "").await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("invalid_message"))
        );
    }
    let server = Server::start(&["--api-key", "k"]).await;
    let (status, body) =
        http_with_body(server.addr, "GET", "/api/rooms/news/history", &key, "").await;
    assert_eq!((status, body["error"].as_str()), (404, Some("not_enabled")));
}

/// The API takes a body up to `--max-frame-size`, the size a socket's frame may have.
#[tokio::test]
async fn the_apis_body_limit_is_the_frame_limit() {
    let key = [("Authorization", "apikey k")];
    let body = format!(r#"{{"roomID":"r","payload":"{}"}}"#, "x".repeat(100_000));
    let server = Server::start(&["--api-key", "k", "--max-frame-size", "200000"]).await;
    let (status, answer) = http_with_body(server.addr, "POST", "/api/publish", &key, &body).await;
    assert_eq!(status, 200, "{answer}");
    let server = Server::start(&["--api-key", "k", "--max-frame-size", "50000"]).await;
    let (status, answer) = http_with_body(server.addr, "POST", "/api/publish", &key, &body).await;
    assert_eq!((status, answer["error"].as_str()), (413, Some("too_large")));
}

#[tokio::test]
async fn the_api_serves_a_rooms_presence() {
    let server = Server::start(&["--api-key", "k", "--presence"]).await;
    let key = [("Authorization", "apikey k")];
    let mut alice = Client::connect_as(&server.url(), "alice").await;
    alice.subscribe("news room").await;
    let mut bob = Client::connect_as(&server.url(), "bob").await;
    bob.subscribe("news room").await;
    let (status, body) = http_with_body(
        server.addr,
        "GET",
        "/api/rooms/news%20room/presence",
        &key,
        "",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["count"], 2);
    let mut members: Vec<String> = serde_json::from_value(body["members"].clone()).unwrap();
    members.sort();
    assert_eq!(members, ["alice", "bob"]);
    let server = Server::start(&["--api-key", "k"]).await;
    let (status, body) =
        http_with_body(server.addr, "GET", "/api/rooms/news/presence", &key, "").await;
    assert_eq!((status, body["error"].as_str()), (404, Some("not_enabled")));
}

/// A presence member in Redis that thinws did not write is the server's fault, not Redis
/// being away: `500 internal`, not `503 unavailable` (which would invite a retry).
#[tokio::test]
async fn the_api_answers_an_unreadable_presence_member_with_internal() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let server = Server::start(&["--redis-url", &url, "--api-key", "k", "--presence"]).await;
    support::plant_unreadable_presence_member(&redis, "odd").await;
    let key = [("Authorization", "apikey k")];
    let (status, body) =
        http_with_body(server.addr, "GET", "/api/rooms/odd/presence", &key, "").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (500, Some("internal")),
        "{body}"
    );
}

//! Heap allocations on the message path, counted with a counting global allocator.
//!
//! A raw client writes pre-encoded frames and reads the server's bytes into a fixed buffer,
//! so it allocates nothing per message: what is counted per message is the server's work
//! (parse, serialise the delivery once, ack, queue, write). The claims:
//! - hooks cost the message path nothing unless a `message` hook is set (no event is built);
//! - the count is small and stable (printed, and bounded here so that a regression shows);
//! - hooks keep a compact copy of the upgrade request's head, not hyper's read buffer that
//!   its parsed headers point into (heap bytes kept per idle socket, also counted here).

use std::alloc::{GlobalAlloc, Layout, System};
use std::convert::Infallible;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use thinws::hooks::{
    ConnectEvent, ConnectVerdict, DisconnectEvent, MessageEvent, MessageVerdict, SubscribeEvent,
    UnsubscribeEvent, Verdict,
};
use thinws::ThinWsLayer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::service_fn;

mod support;

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
/// Bytes allocated and not yet freed.
static LIVE_BYTES: AtomicI64 = AtomicI64::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; the counters are
// relaxed atomics that do not allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        LIVE_BYTES.fetch_add(layout.size() as i64, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        LIVE_BYTES.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The counters are process-wide: the tests of this file take turns.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A masked client text frame with a zero mask key (legal, and the payload stays as is).
fn client_frame(text: &str, out: &mut Vec<u8>) {
    out.push(0x81);
    let len = text.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    }
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(text.as_bytes());
}

/// Average allocations per published message (with its ack and its delivery to the sender)
/// on a node built with `layer`.
async fn allocations_per_message(layer: ThinWsLayer) -> f64 {
    const N: usize = 2000;
    let node = support::Node::start(layer).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(node.url()).await.unwrap();
    let mut setup = Vec::new();
    client_frame(
        r#"{"type":"subscribe","messageID":0,"roomID":"r"}"#,
        &mut setup,
    );
    let frames: Vec<Vec<u8>> = (0..N)
        .map(|i| {
            let mut f = Vec::new();
            client_frame(
                &format!(
                    r#"{{"type":"message","messageID":{},"roomID":"r","payload":{{"n":{i}}}}}"#,
                    100_000 + i
                ),
                &mut f,
            );
            f
        })
        .collect();
    let tcp = match ws.get_mut() {
        tokio_tungstenite::MaybeTlsStream::Plain(tcp) => tcp,
        _ => unreachable!("plain TCP"),
    };
    tcp.write_all(&setup).await.unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let ack0 = br#"{"type":"ack","messageID":0}"#;
    let mut seen = 0;
    while seen < ack0.len() + 2 {
        seen += tcp.read(&mut buf[seen..]).await.unwrap();
    }
    // Bytes the server sends for message `i`: its ack and its delivery to the sender,
    // whose server-generated connectionID is "{instance:016x}-1" (the node's first socket).
    let reply_bytes = |i: usize| {
        let ack = format!(r#"{{"type":"ack","messageID":{}}}"#, 100_000 + i);
        let delivery = format!(
            r#"{{"type":"message","roomID":"r","connectionID":"{:018}","payload":{{"n":{i}}}}}"#,
            0
        );
        ack.len() + 2 + delivery.len() + 2
    };
    // Warm up (first-use allocations of buffers and queues), then measure.
    let split = N / 4;
    let mut per_message = 0.0;
    for range in [0..split, split..N] {
        let n = range.len();
        let expected: usize = range.clone().map(reply_bytes).sum();
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        for f in &frames[range] {
            tcp.write_all(f).await.unwrap();
        }
        let mut got = 0;
        while got < expected {
            let k = tcp.read(&mut buf).await.unwrap();
            assert!(k > 0, "socket closed");
            got += k;
        }
        assert_eq!(got, expected);
        per_message = (ALLOCATIONS.load(Ordering::Relaxed) - before) as f64 / n as f64;
    }
    per_message
}

#[tokio::test(flavor = "current_thread")]
async fn hooks_cost_the_message_path_nothing_unless_a_message_hook_is_set() {
    let _turn = ONE_AT_A_TIME.lock().await;
    // No rate limit: the test sends 2,000 frames back to back.
    let builder = || ThinWsLayer::builder().rate_limit(0, 0);
    let plain = allocations_per_message(builder().build()).await;
    let other_hooks = allocations_per_message(
        builder()
            .on_connect(service_fn(|_: ConnectEvent| async {
                Ok::<_, Infallible>(ConnectVerdict::Accept)
            }))
            .on_subscribe(service_fn(|_: SubscribeEvent| async {
                Ok::<_, Infallible>(Verdict::Allow)
            }))
            .on_unsubscribe(service_fn(|_: UnsubscribeEvent| async {
                Ok::<_, Infallible>(Verdict::Allow)
            }))
            .on_disconnect(service_fn(|_: DisconnectEvent| async {
                Ok::<_, Infallible>(())
            }))
            .build(),
    )
    .await;
    let message_hook = allocations_per_message(
        builder()
            .on_message(service_fn(|_: MessageEvent| async {
                Ok::<_, Infallible>(MessageVerdict::Allow)
            }))
            .build(),
    )
    .await;
    println!("allocations per message: no hooks {plain:.2}, other hooks {other_hooks:.2}, message hook {message_hook:.2}");
    assert!(
        (other_hooks - plain).abs() < 0.05,
        "no hooks {plain:.2} vs other hooks {other_hooks:.2}"
    );
    // The measurement can tell: a message hook builds an event (room, payload, socket info).
    assert!(
        message_hook >= plain + 2.0,
        "message hook {message_hook:.2} vs {plain:.2}"
    );
    assert!(
        plain <= 8.0,
        "the message path allocates {plain:.2} times per message"
    );
}

/// Opens a WebSocket by hand (a browser-like upgrade request, read into a stack buffer) and
/// subscribes it to `room`, so the client side allocates next to nothing.
async fn idle_socket(addr: std::net::SocketAddr, room: &str) -> tokio::net::TcpStream {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = "GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
        Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
        Sec-WebSocket-Version: 13\r\nOrigin: http://localhost\r\n\
        User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/156.0 Safari/537.36\r\n\
        Cookie: session=0123456789abcdef0123456789abcdef; theme=dark\r\n\
        Accept-Language: en-GB,en;q=0.9\r\n\r\n";
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut buf = [0u8; 1024];
    let mut got = 0;
    while !buf[..got].windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tcp.read(&mut buf[got..]).await.unwrap();
        assert!(n > 0, "closed during the handshake");
        got += n;
    }
    assert!(buf.starts_with(b"HTTP/1.1 101"), "not upgraded");
    let mut frame = Vec::new();
    client_frame(
        &format!(r#"{{"type":"subscribe","messageID":1,"roomID":"{room}"}}"#),
        &mut frame,
    );
    tcp.write_all(&frame).await.unwrap();
    let ack = br#"{"type":"ack","messageID":1}"#;
    let mut got = 0;
    while got < ack.len() + 2 {
        let n = tcp.read(&mut buf[got..]).await.unwrap();
        assert!(n > 0, "closed before the ack");
        got += n;
    }
    tcp
}

/// Heap bytes kept per idle subscribed socket (client side included, a few hundred bytes)
/// on a node built with `layer`.
async fn heap_per_idle_socket(layer: ThinWsLayer) -> f64 {
    const N: usize = 200;
    let hub = layer.hub();
    let node = support::Node::start(layer).await;
    // The first socket pays for first-use allocations (the room, maps, timers).
    let mut sockets = vec![idle_socket(node.addr, "idle").await];
    support::members(&hub, "idle", 1).await;
    // Measured once the server's tasks are done with the upgrades (the heap stops moving).
    let live = || LIVE_BYTES.load(Ordering::Relaxed);
    let before = support::settled("the heap to settle", 3, live).await;
    for _ in 0..N {
        sockets.push(idle_socket(node.addr, "idle").await);
    }
    support::members(&hub, "idle", N + 1).await;
    let after = support::settled("the heap to settle", 3, live).await;
    let per_socket = (after - before) as f64 / N as f64;
    drop(sockets);
    per_socket
}

#[tokio::test(flavor = "current_thread")]
async fn hooks_keep_a_compact_copy_of_the_upgrade_request_not_the_read_buffer() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let plain = heap_per_idle_socket(ThinWsLayer::builder().build()).await;
    let with_hooks = heap_per_idle_socket(
        ThinWsLayer::builder()
            .on_connect(service_fn(|_: ConnectEvent| async {
                Ok::<_, Infallible>(ConnectVerdict::Accept)
            }))
            .build(),
    )
    .await;
    println!("heap bytes per idle socket: no hooks {plain:.0}, with hooks {with_hooks:.0}");
    // The head copied for hooks (URI, ~450 bytes of headers, the map: 1.7 KiB measured) is
    // well under 4 KiB; keeping hyper's parsed head instead would keep its read buffer,
    // 9.7 KiB. Server and client heap together (the client's share is a few hundred
    // bytes): 4.1 KB measured (BENCHMARKS.md has the history).
    assert!(
        plain < 5120.0,
        "an idle subscribed socket keeps {plain:.0} bytes of heap"
    );
    assert!(
        with_hooks - plain < 4096.0,
        "hooks keep {:.0} more bytes per socket",
        with_hooks - plain
    );
}

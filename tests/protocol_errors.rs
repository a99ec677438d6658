//! WebSocket protocol errors from a client close the socket with RFC 6455's codes: 1002
//! (protocol error) and 1007 (invalid data), not 1001. Raw frames over a real TCP socket.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;
use support::{Client, Node};
use thinws::ThinWsLayer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Opens a socket with a hand-written upgrade request.
async fn upgrade(addr: SocketAddr) -> TcpStream {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    support::upgrade_by_hand(&mut tcp).await;
    tcp
}

/// A frame with the given first byte (FIN, RSV bits, opcode), masked or not.
fn frame(first: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut out = vec![first];
    let mask_bit = if masked { 0x80 } else { 0 };
    if payload.len() < 126 {
        out.push(mask_bit | payload.len() as u8);
    } else {
        out.push(mask_bit | 126);
        out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    }
    if masked {
        // A zero mask leaves the payload as it is.
        out.extend_from_slice(&[0, 0, 0, 0]);
    }
    out.extend_from_slice(payload);
    out
}

/// Reads server frames until a close frame; returns its code (`None`: closed without one,
/// `Some(1005)`: an empty close frame).
async fn close_code(tcp: &mut TcpStream) -> Option<u16> {
    let read = async {
        loop {
            let mut head = [0u8; 2];
            tcp.read_exact(&mut head).await.ok()?;
            let mut len = (head[1] & 0x7f) as usize;
            if len == 126 {
                let mut ext = [0u8; 2];
                tcp.read_exact(&mut ext).await.ok()?;
                len = u16::from_be_bytes(ext) as usize;
            } else if len == 127 {
                let mut ext = [0u8; 8];
                tcp.read_exact(&mut ext).await.ok()?;
                len = u64::from_be_bytes(ext) as usize;
            }
            let mut payload = vec![0u8; len];
            tcp.read_exact(&mut payload).await.ok()?;
            if head[0] & 0x0f == 0x8 {
                return Some(match payload.get(..2) {
                    Some(code) => u16::from_be_bytes([code[0], code[1]]),
                    None => 1005,
                });
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("the server neither closed nor answered")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_errors_close_with_1002_and_invalid_utf8_with_1007() {
    let node = Node::start(ThinWsLayer::in_memory()).await;
    let cases: [(&str, Vec<u8>, u16); 5] = [
        (
            "invalid UTF-8 in a text frame",
            frame(0x81, &[0xff, 0xfe, b'{'], true),
            1007,
        ),
        (
            "RSV1 without a negotiated extension",
            frame(0xc1, b"{}", true),
            1002,
        ),
        ("an unmasked client frame", frame(0x81, b"{}", false), 1002),
        ("a reserved opcode", frame(0x83, b"{}", true), 1002),
        (
            "a control frame over 125 bytes",
            frame(0x89, &[b'x'; 126], true),
            1002,
        ),
    ];
    for (what, bytes, expected) in cases {
        // Several times each: the close must not race with the socket's end.
        for run in 0..40 {
            let mut tcp = upgrade(node.addr).await;
            tcp.write_all(&bytes).await.unwrap();
            assert_eq!(
                close_code(&mut tcp).await,
                Some(expected),
                "{what}, run {run}"
            );
        }
    }
    // The node is fine afterwards.
    let mut ok = support::Client::connect(&node.url()).await;
    ok.subscribe("r").await;
}

/// A client that closes first while frames wait for it: whatever the server still sends
/// comes before its close frame, never after it (RFC 6455 §5.5.1: nothing follows a close).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_follows_the_servers_close_frame_when_the_client_closes_first() {
    let node = Node::start(
        ThinWsLayer::builder()
            .rate_limit(0, 0)
            .max_queued_bytes(16 << 20)
            .build(),
    )
    .await;
    // A small receive buffer, so that the node's writes to this client wait.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut tcp = socket.connect(node.addr).await.unwrap();
    support::upgrade_by_hand(&mut tcp).await;
    let subscribe = br#"{"type":"subscribe","messageID":1,"roomID":"r"}"#;
    tcp.write_all(&frame(0x81, subscribe, true)).await.unwrap();
    support::members(&node.hub, "r", 1).await;
    let mut publisher = Client::connect(&node.url()).await;
    let pad = "x".repeat(16 * 1024);
    let mut sent = 0;
    while node.hub.queued_bytes() == 0 {
        assert!(sent < 600, "the node's writes to the client never waited");
        publisher.publish("r", json!({"i": sent, "pad": pad})).await;
        sent += 1;
    }
    // Frames wait in the node's queue; the client closes.
    tcp.write_all(&frame(0x88, &1000u16.to_be_bytes(), true))
        .await
        .unwrap();
    // Everything the server sends, frame by frame, until it closes the connection.
    let mut opcodes = Vec::new();
    support::within("the server to finish", async {
        loop {
            let mut head = [0u8; 2];
            if tcp.read_exact(&mut head).await.is_err() {
                break;
            }
            let mut len = (head[1] & 0x7f) as usize;
            if len == 126 {
                let mut ext = [0u8; 2];
                tcp.read_exact(&mut ext).await.unwrap();
                len = u16::from_be_bytes(ext) as usize;
            } else if len == 127 {
                let mut ext = [0u8; 8];
                tcp.read_exact(&mut ext).await.unwrap();
                len = u64::from_be_bytes(ext) as usize;
            }
            let mut payload = vec![0u8; len];
            tcp.read_exact(&mut payload).await.unwrap();
            opcodes.push(head[0] & 0x0f);
        }
    })
    .await;
    let close = opcodes.iter().position(|&op| op == 0x8);
    assert!(
        close.is_some(),
        "no close frame among {} frames",
        opcodes.len()
    );
    assert_eq!(
        close,
        Some(opcodes.len() - 1),
        "frames after the close frame: {:?}",
        &opcodes[close.unwrap()..]
    );
}

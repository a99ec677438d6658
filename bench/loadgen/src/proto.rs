//! The two wire protocols the load generator speaks: ThinWS, and Socket.IO (Engine.IO v4
//! over WebSocket only).

use std::net::IpAddr;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Ws = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;
pub type Tx = SplitSink<Ws, Message>;
pub type Rx = SplitStream<Ws>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    Thinws,
    Socketio,
}

/// What a frame from the server is, as far as the benchmark cares.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    /// The ack of request `id`.
    Ack(u64),
    /// A delivered message: its payload's `s` (sequence), `t` (send time, µs) and `f`
    /// (sender index).
    Delivery {
        seq: u64,
        sent_us: u64,
        from: u64,
    },
    /// Engine.IO ping: answer with a pong.
    Ping,
    Other,
}

/// Reads the unsigned integer after `key` (e.g. `"s":`) in `text`.
fn number_after(text: &str, key: &str) -> Option<u64> {
    let start = text.find(key)? + key.len();
    let digits = text[start..].bytes().take_while(u8::is_ascii_digit).count();
    text[start..start + digits].parse().ok()
}

/// Reads the digits at the start of `bytes`; returns the number and the rest.
fn digits(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let n = bytes.iter().take_while(|b| b.is_ascii_digit()).count();
    let mut value: u64 = 0;
    for b in &bytes[..n] {
        value = value.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    (n > 0).then_some((value, &bytes[n..]))
}

/// The payload is `{"s":N,"t":N,"f":N,...}` as the generator wrote it, though a server may
/// reorder its keys (socketioxide sorts them): one SIMD search per key.
fn delivery(text: &str) -> Incoming {
    use memchr::memmem::Finder;
    use std::sync::OnceLock;
    static KEYS: OnceLock<[Finder<'static>; 3]> = OnceLock::new();
    let [s, t, f] = KEYS.get_or_init(|| {
        [
            Finder::new(br#""s":"#),
            Finder::new(br#""t":"#),
            Finder::new(br#""f":"#),
        ]
    });
    let bytes = text.as_bytes();
    let value = |finder: &Finder<'_>| {
        let at = finder.find(bytes)? + 4;
        digits(&bytes[at..]).map(|(v, _)| v)
    };
    match (value(s), value(t), value(f)) {
        (Some(seq), Some(sent_us), Some(from)) => Incoming::Delivery { seq, sent_us, from },
        _ => Incoming::Other,
    }
}

impl Target {
    /// The WebSocket URL of a node at `base` (`http://host:port`).
    pub fn url(self, base: &str) -> String {
        let ws = base.replacen("http://", "ws://", 1);
        let ws = ws.trim_end_matches('/');
        match self {
            Target::Thinws => format!("{ws}/"),
            Target::Socketio => format!("{ws}/socket.io/?EIO=4&transport=websocket"),
        }
    }

    pub fn parse(self, text: &str) -> Incoming {
        match self {
            Target::Thinws => {
                if text.starts_with(r#"{"type":"ack""#) {
                    number_after(text, "\"messageID\":").map_or(Incoming::Other, Incoming::Ack)
                } else if text.starts_with(r#"{"type":"message""#) {
                    delivery(text)
                } else {
                    Incoming::Other
                }
            }
            Target::Socketio => {
                if text == "2" {
                    Incoming::Ping
                } else if let Some(rest) = text.strip_prefix("43") {
                    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
                    rest[..digits]
                        .parse()
                        .map_or(Incoming::Other, Incoming::Ack)
                } else if text.starts_with("42[\"message\"") {
                    delivery(text)
                } else {
                    Incoming::Other
                }
            }
        }
    }

    pub fn subscribe(self, id: u64, room: &str) -> String {
        match self {
            Target::Thinws => {
                format!(r#"{{"type":"subscribe","messageID":{id},"roomID":"{room}"}}"#)
            }
            Target::Socketio => format!(r#"42{id}["subscribe","{room}"]"#),
        }
    }

    /// A message whose payload carries the sequence, send time and sender, padded to
    /// about `size` bytes; for thinws with `keyed`, with an idempotency key (protocol 1.2)
    /// of its own.
    #[allow(clippy::too_many_arguments)]
    pub fn message(
        self,
        id: u64,
        room: &str,
        seq: u64,
        sent_us: u64,
        from: u64,
        pad: &str,
        keyed: bool,
    ) -> String {
        let payload = format!(r#"{{"s":{seq},"t":{sent_us},"f":{from},"p":"{pad}"}}"#);
        match self {
            Target::Thinws if keyed => format!(
                r#"{{"type":"message","messageID":{id},"roomID":"{room}","payload":{payload},"key":"{from}-{seq}"}}"#
            ),
            Target::Thinws => format!(
                r#"{{"type":"message","messageID":{id},"roomID":"{room}","payload":{payload}}}"#
            ),
            Target::Socketio => {
                format!(r#"42{id}["message",{{"room":"{room}","payload":{payload}}}]"#)
            }
        }
    }
}

/// Opens a socket from `source` (a loopback address, so that many sockets can exceed one
/// address's ephemeral ports) and completes the protocol's handshake.
pub async fn connect(
    target: Target,
    url: &str,
    source: Option<IpAddr>,
) -> Result<(Tx, Rx), String> {
    let host = url
        .split("//")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .ok_or("bad url")?;
    let addr: std::net::SocketAddr = host.parse().map_err(|e| format!("{host}: {e}"))?;
    let socket = TcpSocket::new_v4().map_err(|e| e.to_string())?;
    if let Some(ip) = source {
        socket
            .bind((ip, 0).into())
            .map_err(|e| format!("bind {ip}: {e}"))?;
    }
    let tcp = socket.connect(addr).await.map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    let config = WebSocketConfig::default().read_buffer_size(4096);
    let (ws, _) =
        tokio_tungstenite::client_async_with_config(url, MaybeTlsStream::Plain(tcp), Some(config))
            .await
            .map_err(|e| e.to_string())?;
    let (mut tx, mut rx) = ws.split();
    if target == Target::Socketio {
        // Engine.IO open packet, then connect to the default namespace.
        expect(&mut tx, &mut rx, |t| t.starts_with('0')).await?;
        tx.send(Message::text("40"))
            .await
            .map_err(|e| e.to_string())?;
        expect(&mut tx, &mut rx, |t| t.starts_with("40")).await?;
    }
    Ok((tx, rx))
}

/// Waits for a frame that `ok` accepts, answering Engine.IO pings meanwhile: engineioxide
/// pings as soon as the socket opens, and closes it 20 s later without a pong.
async fn expect(tx: &mut Tx, rx: &mut Rx, ok: impl Fn(&str) -> bool) -> Result<(), String> {
    while let Some(message) = rx.next().await {
        if let Message::Text(text) = message.map_err(|e| e.to_string())? {
            if ok(&text) {
                return Ok(());
            }
            if text.as_str() == "2" {
                tx.send(Message::text("3"))
                    .await
                    .map_err(|e| e.to_string())?;
            }
        }
    }
    Err("closed during the handshake".into())
}

/// Sends a thinws request and returns the text of its ack (an error frame is an error).
pub async fn request_text(
    tx: &mut Tx,
    rx: &mut Rx,
    id: u64,
    frame: String,
) -> Result<String, String> {
    tx.send(Message::text(frame))
        .await
        .map_err(|e| e.to_string())?;
    while let Some(message) = rx.next().await {
        if let Message::Text(text) = message.map_err(|e| e.to_string())? {
            let id_field = format!(r#""messageID":{id}"#);
            if text.contains(&id_field) {
                return match text.starts_with(r#"{"type":"ack""#) {
                    true => Ok(text.to_string()),
                    false => Err(text.to_string()),
                };
            }
        }
    }
    Err("closed before the ack".into())
}

/// Sends a request and waits for its ack, answering pings meanwhile.
pub async fn request(
    target: Target,
    tx: &mut Tx,
    rx: &mut Rx,
    id: u64,
    frame: String,
) -> Result<(), String> {
    tx.send(Message::text(frame))
        .await
        .map_err(|e| e.to_string())?;
    while let Some(message) = rx.next().await {
        let message = message.map_err(|e| e.to_string())?;
        if let Message::Close(reason) = &message {
            return Err(format!("closed before the ack: {reason:?}"));
        }
        if let Message::Text(text) = message {
            match target.parse(&text) {
                Incoming::Ack(got) if got == id => return Ok(()),
                Incoming::Ping => tx
                    .send(Message::text("3"))
                    .await
                    .map_err(|e| e.to_string())?,
                _ => {}
            }
        }
    }
    Err("closed before the ack".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_protocols() {
        let t = Target::Thinws;
        assert_eq!(
            t.parse(r#"{"type":"ack","messageID":17}"#),
            Incoming::Ack(17)
        );
        let m = t.message(1, "r", 5, 123, 9, "xx", false);
        let d = m.replace(
            r#""type":"message","messageID":1,"roomID":"r","payload""#,
            r#""type":"message","roomID":"r","connectionID":"a","payload""#,
        );
        assert_eq!(
            t.parse(&d),
            Incoming::Delivery {
                seq: 5,
                sent_us: 123,
                from: 9
            }
        );
        let s = Target::Socketio;
        assert_eq!(s.parse("4312[]"), Incoming::Ack(12));
        assert_eq!(s.parse("2"), Incoming::Ping);
        let d = r#"42["message",{"room":"r","from":"x","payload":{"s":3,"t":44,"f":2,"p":"zz"}}]"#;
        assert_eq!(
            s.parse(d),
            Incoming::Delivery {
                seq: 3,
                sent_us: 44,
                from: 2
            }
        );
        // Keys sorted, as socketioxide re-serialises them.
        let d = r#"42["message",{"from":"x","payload":{"f":2,"p":"zz","s":3,"t":44},"room":"r"}]"#;
        assert_eq!(
            s.parse(d),
            Incoming::Delivery {
                seq: 3,
                sent_us: 44,
                from: 2
            }
        );
        assert_eq!(
            s.url("http://127.0.0.1:9"),
            "ws://127.0.0.1:9/socket.io/?EIO=4&transport=websocket"
        );
    }
}

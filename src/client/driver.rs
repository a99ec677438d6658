//! The task that owns the client's connection: sends requests, matches replies, forwards
//! deliveries, and reconnects.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::{ClientBuilder, ClientError, Delivery, Op, Request};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;
type Reply = oneshot::Sender<Result<(), ClientError>>;

/// A frame from the server, as far as the client reads it.
#[derive(Deserialize)]
struct ServerFrame {
    #[serde(rename = "type")]
    kind: String,
    #[serde(rename = "messageID", default)]
    message_id: Value,
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
    #[serde(rename = "roomID", default)]
    room: String,
    #[serde(rename = "connectionID", default)]
    sender: String,
    #[serde(default)]
    payload: Value,
}

fn encode(id: u64, op: &Op) -> String {
    #[derive(serde::Serialize)]
    struct Frame<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        #[serde(rename = "messageID")]
        message_id: u64,
        #[serde(rename = "roomID")]
        room: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        payload: Option<&'a RawValue>,
    }
    let (kind, room, payload) = match op {
        Op::Subscribe(room) => ("subscribe", room, None),
        Op::Unsubscribe(room) => ("unsubscribe", room, None),
        Op::Message(room, payload) => ("message", room, Some(&**payload)),
    };
    serde_json::to_string(&Frame {
        kind,
        message_id: id,
        room,
        payload,
    })
    .unwrap_or_default()
}

/// Opens a socket and binds it to the identity; the server has rejoined the identity's
/// rooms when this returns.
pub(super) async fn open(config: &ClientBuilder) -> Result<Socket, String> {
    let connect = async {
        let (mut socket, _) = tokio_tungstenite::connect_async(config.url.as_str())
            .await
            .map_err(|e| e.to_string())?;
        let frame = serde_json::json!({
            "type": "connect",
            "messageID": 0,
            "connectionID": config.connection_id,
        });
        socket
            .send(Message::text(frame.to_string()))
            .await
            .map_err(|e| e.to_string())?;
        while let Some(message) = socket.next().await {
            let Message::Text(text) = message.map_err(|e| e.to_string())? else {
                continue;
            };
            let Ok(frame) = serde_json::from_str::<ServerFrame>(&text) else {
                continue;
            };
            if frame.message_id != 0 {
                continue;
            }
            return match frame.kind.as_str() {
                "ack" => Ok(socket),
                _ => Err(format!(
                    "connect refused: {}: {}",
                    frame.code, frame.message
                )),
            };
        }
        Err("the server closed the socket during connect".to_owned())
    };
    tokio::time::timeout(config.request_timeout, connect)
        .await
        .unwrap_or_else(|_| Err("no answer to connect in time".to_owned()))
}

/// Why a connected session ended.
enum End {
    Lost,
    Closed,
}

pub(super) async fn drive(
    config: ClientBuilder,
    first: Socket,
    mut requests: mpsc::Receiver<Request>,
    deliveries: mpsc::Sender<Delivery>,
    mut queued: VecDeque<(Op, Reply)>,
    connected: Arc<AtomicBool>,
) {
    let policy = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(config.max_backoff)
        .with_jitter()
        .without_max_times();
    let mut next_id: u64 = 1;
    let mut socket = Some(first);
    loop {
        if let Some(mut open) = socket.take() {
            connected.store(true, Ordering::Relaxed);
            let end = session(
                &mut open,
                &mut requests,
                &deliveries,
                &mut queued,
                &mut next_id,
            )
            .await;
            connected.store(false, Ordering::Relaxed);
            match end {
                End::Closed => return,
                End::Lost => tracing::debug!("connection lost; reconnecting"),
            }
        }
        // Reconnect with backoff, queueing requests meanwhile.
        let mut delays = policy.build();
        while socket.is_none() {
            let delay = delays.next().unwrap_or(config.max_backoff);
            let pause = tokio::time::sleep(delay);
            tokio::pin!(pause);
            loop {
                tokio::select! {
                    _ = &mut pause => break,
                    request = requests.recv() => match request {
                        None => return,
                        Some(Request::Close(done)) => {
                            let _ = done.send(());
                            return;
                        }
                        Some(Request::Op { op, reply }) => {
                            if queued.len() >= config.max_queued {
                                let _ = reply.send(Err(ClientError::QueueFull));
                            } else {
                                queued.push_back((op, reply));
                            }
                        }
                    },
                }
            }
            match open(&config).await {
                Ok(s) => socket = Some(s),
                Err(e) => tracing::debug!(error = %e, "reconnect failed"),
            }
        }
    }
}

async fn session(
    socket: &mut Socket,
    requests: &mut mpsc::Receiver<Request>,
    deliveries: &mpsc::Sender<Delivery>,
    queued: &mut VecDeque<(Op, Reply)>,
    next_id: &mut u64,
) -> End {
    let mut in_flight: HashMap<u64, Reply> = HashMap::new();
    let end = 'session: {
        // What waited for the connection goes first, in order (unless its caller gave up).
        while let Some((op, reply)) = queued.pop_front() {
            if reply.is_closed() {
                continue;
            }
            if let Err(unsent) = send(socket, &mut in_flight, next_id, op, reply).await {
                queued.push_front(unsent);
                break 'session End::Lost;
            }
        }
        loop {
            tokio::select! {
                request = requests.recv() => match request {
                    None => break 'session End::Closed,
                    Some(Request::Close(done)) => {
                        let _ = tokio::time::timeout(Duration::from_secs(2), socket.close(None)).await;
                        let _ = done.send(());
                        break 'session End::Closed;
                    }
                    Some(Request::Op { op, reply }) => {
                        if let Err(unsent) = send(socket, &mut in_flight, next_id, op, reply).await {
                            queued.push_front(unsent);
                            break 'session End::Lost;
                        }
                    }
                },
                message = socket.next() => match message {
                    Some(Ok(Message::Text(text))) => {
                        let Ok(frame) = serde_json::from_str::<ServerFrame>(&text) else {
                            continue;
                        };
                        match frame.kind.as_str() {
                            "message" => {
                                let delivery = Delivery {
                                    room: frame.room,
                                    sender: frame.sender,
                                    payload: frame.payload,
                                };
                                // Nobody reads the stream any more: drop deliveries.
                                let _ = deliveries.send(delivery).await;
                            }
                            "ack" | "error" => {
                                let Some(id) = frame.message_id.as_u64() else { continue };
                                if let Some(reply) = in_flight.remove(&id) {
                                    let result = match frame.kind.as_str() {
                                        "ack" => Ok(()),
                                        _ => Err(ClientError::Server {
                                            code: frame.code,
                                            message: frame.message,
                                        }),
                                    };
                                    let _ = reply.send(result);
                                }
                            }
                            _ => {}
                        }
                    }
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break 'session End::Lost,
                    Some(Ok(_)) => {}
                },
            }
        }
    };
    for (_, reply) in in_flight {
        let _ = reply.send(Err(ClientError::Disconnected));
    }
    end
}

/// Sends one request; gives it back when the connection is gone (it goes out again after
/// reconnecting).
async fn send(
    socket: &mut Socket,
    in_flight: &mut HashMap<u64, Reply>,
    next_id: &mut u64,
    op: Op,
    reply: Reply,
) -> Result<(), (Op, Reply)> {
    let id = *next_id;
    *next_id += 1;
    match socket.send(Message::text(encode(id, &op))).await {
        Ok(()) => {
            in_flight.insert(id, reply);
            Ok(())
        }
        Err(_) => Err((op, reply)),
    }
}

//! The task that owns the client's connection: sends requests, matches replies, forwards
//! deliveries, and reconnects.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use futures_util::{SinkExt, StreamExt};
use std::borrow::Cow;

use serde_json::value::RawValue;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::{ClientBuilder, ClientError, Delivery, Op, Request};
use crate::protocol::server::{self, ServerFrame};
use crate::protocol::{self, Command, ErrorCode};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;
type Reply = oneshot::Sender<Result<(), ClientError>>;

/// The frame for request `id`.
fn encode(id: u64, op: &Op) -> String {
    let command = match op {
        Op::Subscribe(room) => Command::Subscribe {
            room: Cow::Borrowed(room),
            since: None,
        },
        Op::Unsubscribe(room) => Command::Unsubscribe {
            room: Cow::Borrowed(room),
        },
        Op::Message(room, payload) => Command::Message {
            room: Cow::Borrowed(room),
            payload,
        },
    };
    protocol::encode(id, &command)
}

/// The request number a server frame answers, if it is one of ours.
fn answered(message_id: Option<&RawValue>) -> Option<u64> {
    message_id.and_then(|id| id.get().parse().ok())
}

/// What an `error` frame means for the request it answers.
fn server_error(code: &str, message: &str) -> ClientError {
    match code.parse::<ErrorCode>() {
        Ok(code) => ClientError::Server {
            code,
            message: message.to_owned(),
        },
        Err(unknown) => ClientError::Protocol(format!("{unknown}: {message}")),
    }
}

/// Opens a socket and binds it to the identity; the server has rejoined the identity's
/// rooms when this returns.
pub(super) async fn open(config: &ClientBuilder) -> Result<Socket, ClientError> {
    let connect = async {
        let token = match &config.token {
            None => None,
            Some(source) => Some(source.get().await?),
        };
        let lost = |e| ClientError::Connect(std::sync::Arc::new(e));
        let (mut socket, _) = tokio_tungstenite::connect_async(config.url.as_str())
            .await
            .map_err(lost)?;
        let frame = protocol::encode(
            0,
            &Command::Connect {
                connection_id: Cow::Borrowed(&config.connection_id),
                token: token.as_deref().map(Cow::Borrowed),
                since: None,
            },
        );
        socket.send(Message::text(frame)).await.map_err(lost)?;
        while let Some(message) = socket.next().await {
            let Message::Text(text) = message.map_err(lost)? else {
                continue;
            };
            match server::parse(&text) {
                Ok(ServerFrame::Ack { message_id }) if answered(Some(message_id)) == Some(0) => {
                    return Ok(socket)
                }
                Ok(ServerFrame::Error {
                    message_id,
                    code,
                    message,
                }) if answered(message_id) == Some(0) => return Err(server_error(&code, &message)),
                _ => continue,
            }
        }
        Err(ClientError::Disconnected)
    };
    tokio::time::timeout(config.request_timeout, connect)
        .await
        .unwrap_or(Err(ClientError::Timeout))
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
                    Some(Ok(Message::Text(text))) => match server::parse(&text) {
                        Ok(ServerFrame::Message { room, connection_id, payload }) => {
                            let Ok(payload) = serde_json::from_str(payload.get()) else {
                                tracing::debug!(%room, "dropped a delivery whose payload this client cannot read");
                                continue;
                            };
                            let delivery = Delivery {
                                room: room.into_owned(),
                                sender: connection_id.into_owned(),
                                payload,
                            };
                            // Nobody reads the stream any more: drop deliveries.
                            let _ = deliveries.send(delivery).await;
                        }
                        Ok(ServerFrame::Ack { message_id }) => {
                            if let Some(reply) = answered(Some(message_id)).and_then(|id| in_flight.remove(&id)) {
                                let _ = reply.send(Ok(()));
                            }
                        }
                        Ok(ServerFrame::Error { message_id, code, message }) => {
                            if let Some(reply) = answered(message_id).and_then(|id| in_flight.remove(&id)) {
                                let _ = reply.send(Err(server_error(&code, &message)));
                            }
                        }
                        Ok(ServerFrame::Other) => {}
                        Err(e) => tracing::debug!(error = %e, "ignored an unreadable frame from the server"),
                    },
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

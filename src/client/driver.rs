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

use super::renewal::Renewal;
use super::{ClientBuilder, ClientError, Delivery, Gap, Member, Op, Request};
use crate::protocol::server::{self, ServerFrame};
use crate::protocol::{self, Command, ErrorCode};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;
type Reply = oneshot::Sender<Result<String, ClientError>>;

/// Where the client's copy of each history room ends: `(offset, epoch)`, by room.
pub(super) type Positions = HashMap<String, (u64, String)>;

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
        Op::History(room, limit, before) => Command::History {
            room: Cow::Borrowed(room),
            limit: *limit,
            before: *before,
        },
        Op::Presence(room) => Command::Presence {
            room: Cow::Borrowed(room),
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

/// Opens the WebSocket: for `wss://`, over rustls with the system's roots and the
/// configured CA.
async fn connect(
    config: &ClientBuilder,
    url: &str,
) -> Result<
    (
        Socket,
        tokio_tungstenite::tungstenite::handshake::client::Response,
    ),
    tokio_tungstenite::tungstenite::Error,
> {
    #[cfg(feature = "tls")]
    if url.starts_with("wss://") {
        let tls = crate::tls::client_config(config.tls_ca_pem.as_deref())
            .map_err(|e| tokio_tungstenite::tungstenite::Error::Io(std::io::Error::other(e)))?;
        let connector = tokio_tungstenite::Connector::Rustls(tls);
        return tokio_tungstenite::connect_async_tls_with_config(url, None, false, Some(connector))
            .await;
    }
    let _ = config;
    tokio_tungstenite::connect_async(url).await
}

/// An open socket bound to the identity, and how long its credential lasts, if the server
/// said.
pub(super) type Opened = (Socket, Option<Duration>);

/// Opens a socket and binds it to the identity; the server has rejoined the identity's
/// rooms when this returns.
pub(super) async fn open(
    config: &ClientBuilder,
    url: &str,
    positions: &mut Positions,
) -> Result<Opened, ClientError> {
    let connect = async {
        let token = match &config.token {
            None => None,
            Some(source) => Some(source.get().await?),
        };
        let lost = |e| ClientError::Connect(std::sync::Arc::new(e));
        let (mut socket, _) = connect(config, url).await.map_err(lost)?;
        // Where each history room ends here, so that the server sends what followed.
        let since: Vec<_> = positions
            .iter()
            .map(|(room, (offset, epoch))| {
                (
                    Cow::Borrowed(room.as_str()),
                    protocol::Since {
                        offset: *offset,
                        epoch: Cow::Borrowed(epoch.as_str()),
                    },
                )
            })
            .collect();
        let frame = protocol::encode(
            0,
            &Command::Connect {
                connection_id: Cow::Borrowed(&config.connection_id),
                token: token.as_deref().map(Cow::Borrowed),
                since: (!since.is_empty()).then_some(since),
            },
        );
        socket.send(Message::text(frame)).await.map_err(lost)?;
        while let Some(message) = socket.next().await {
            let Message::Text(text) = message.map_err(lost)? else {
                continue;
            };
            match server::parse(&text) {
                Ok(ServerFrame::Ack {
                    message_id,
                    rooms,
                    expires_in,
                    ..
                }) if answered(Some(message_id)) == Some(0) => {
                    rejoined(config, positions, rooms);
                    return Ok((socket, expires_in.map(Duration::from_secs)));
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

/// Reads the rooms of a `connect` ack: a history room that could not be recovered is a
/// gap for the application, and rooms the identity no longer has are forgotten.
fn rejoined(config: &ClientBuilder, positions: &mut Positions, rooms: Option<&RawValue>) {
    #[derive(serde::Deserialize)]
    struct RoomAck {
        offset: Option<u64>,
        epoch: Option<String>,
        recovered: Option<bool>,
    }
    let Some(rooms) =
        rooms.and_then(|r| serde_json::from_str::<HashMap<String, RoomAck>>(r.get()).ok())
    else {
        return;
    };
    positions.retain(|room, _| rooms.contains_key(room));
    for (room, ack) in rooms {
        if let (Some(false), Some(offset), Some(epoch)) = (ack.recovered, ack.offset, ack.epoch) {
            positions.insert(room.clone(), (offset, epoch.clone()));
            config.gap(Gap {
                room,
                offset: Some(offset),
                epoch: Some(epoch),
            });
        }
    }
}

/// Why a connected session ended.
enum End {
    Lost,
    Closed,
}

pub(super) async fn drive(
    config: ClientBuilder,
    first: Opened,
    mut requests: mpsc::Receiver<Request>,
    deliveries: mpsc::Sender<Delivery>,
    mut queued: VecDeque<(Op, Reply)>,
    connected: Arc<AtomicBool>,
    mut positions: Positions,
) {
    let policy = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(config.max_backoff)
        .with_jitter()
        .without_max_times();
    let mut next_id: u64 = 1;
    let mut socket = Some(first);
    // Which URL the client tries next (see `ClientBuilder::fallback_urls`).
    let mut attempt = 0usize;
    loop {
        if let Some((mut open, expires_in)) = socket.take() {
            connected.store(true, Ordering::Relaxed);
            let end = session(
                &config,
                &mut open,
                Renewal::new(config.token.as_ref(), expires_in),
                &mut requests,
                &deliveries,
                &mut queued,
                &mut next_id,
                &mut positions,
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
            attempt += 1;
            match open(&config, config.url_for(attempt), &mut positions).await {
                Ok(s) => socket = Some(s),
                Err(e) => tracing::debug!(error = %e, "reconnect failed"),
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn session(
    config: &ClientBuilder,
    socket: &mut Socket,
    mut renewal: Renewal,
    requests: &mut mpsc::Receiver<Request>,
    deliveries: &mpsc::Sender<Delivery>,
    queued: &mut VecDeque<(Op, Reply)>,
    next_id: &mut u64,
    positions: &mut Positions,
) -> End {
    let mut in_flight: HashMap<u64, (Reply, Option<String>)> = HashMap::new();
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
                token = renewal.token() => {
                    let (reply, answer) = oneshot::channel();
                    let id = *next_id;
                    *next_id += 1;
                    let frame = protocol::encode(id, &Command::Refresh { token: Cow::Borrowed(&token) });
                    if socket.send(Message::text(frame)).await.is_err() {
                        break 'session End::Lost;
                    }
                    in_flight.insert(id, (reply, None));
                    renewal.sent(answer);
                }
                message = socket.next() => match message {
                    Some(Ok(Message::Text(text))) => match server::parse(&text) {
                        Ok(ServerFrame::Message { room, connection_id, payload, offset, epoch }) => {
                            if let (Some(offset), Some(epoch)) = (offset, &epoch) {
                                // Seen already (recovery may resend what arrived live).
                                if !advance(positions, &room, offset, epoch) {
                                    continue;
                                }
                            }
                            let Ok(payload) = serde_json::from_str(payload.get()) else {
                                tracing::debug!(%room, "dropped a delivery whose payload this client cannot read");
                                continue;
                            };
                            let delivery = Delivery {
                                room: room.into_owned(),
                                sender: connection_id.into_owned(),
                                payload,
                                offset,
                                epoch: epoch.map(Cow::into_owned),
                            };
                            // Nobody reads the stream any more: drop deliveries.
                            let _ = deliveries.send(delivery).await;
                        }
                        Ok(ServerFrame::Ack { message_id, offset, epoch, .. }) => {
                            if let Some((reply, subscribed)) = answered(Some(message_id)).and_then(|id| in_flight.remove(&id)) {
                                // A history room's subscribe ack: where the client starts.
                                if let (Some(room), Some(offset), Some(epoch)) = (subscribed, offset, epoch) {
                                    positions.entry(room).or_insert((offset, epoch.into_owned()));
                                }
                                let _ = reply.send(Ok(text.as_str().to_owned()));
                            }
                        }
                        Ok(ServerFrame::Error { message_id, code, message }) => {
                            if let Some((reply, _)) = answered(message_id).and_then(|id| in_flight.remove(&id)) {
                                let _ = reply.send(Err(server_error(&code, &message)));
                            }
                        }
                        Ok(ServerFrame::Gap { room, offset, epoch }) => {
                            if let (Some(offset), Some(epoch)) = (offset, &epoch) {
                                positions.insert(room.to_string(), (offset, epoch.to_string()));
                            }
                            config.gap(Gap { room: room.into_owned(), offset, epoch: epoch.map(Cow::into_owned) });
                        }
                        Ok(ServerFrame::Join { room, connection_id }) => config.presence_event(true, Member { room: room.into_owned(), connection_id: connection_id.into_owned() }),
                        Ok(ServerFrame::Leave { room, connection_id }) => config.presence_event(false, Member { room: room.into_owned(), connection_id: connection_id.into_owned() }),
                        Ok(_) => {}
                        Err(e) => tracing::debug!(error = %e, "ignored an unreadable frame from the server"),
                    },
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break 'session End::Lost,
                    Some(Ok(_)) => {}
                },
            }
        }
    };
    for (_, (reply, _)) in in_flight {
        let _ = reply.send(Err(ClientError::Disconnected));
    }
    end
}

/// Records a delivery at `offset` in `room`; false when the client had it already.
fn advance(positions: &mut Positions, room: &str, offset: u64, epoch: &str) -> bool {
    match positions.get_mut(room) {
        Some((last, last_epoch)) if last_epoch == epoch => {
            if offset <= *last {
                return false;
            }
            *last = offset;
        }
        Some(position) => *position = (offset, epoch.to_owned()),
        None => {
            positions.insert(room.to_owned(), (offset, epoch.to_owned()));
        }
    }
    true
}

/// Sends one request; gives it back when the connection is gone (it goes out again after
/// reconnecting).
async fn send(
    socket: &mut Socket,
    in_flight: &mut HashMap<u64, (Reply, Option<String>)>,
    next_id: &mut u64,
    op: Op,
    reply: Reply,
) -> Result<(), (Op, Reply)> {
    let id = *next_id;
    *next_id += 1;
    match socket.send(Message::text(encode(id, &op))).await {
        Ok(()) => {
            let subscribed = match &op {
                Op::Subscribe(room) => Some(room.clone()),
                _ => None,
            };
            in_flight.insert(id, (reply, subscribed));
            Ok(())
        }
        Err(_) => Err((op, reply)),
    }
}

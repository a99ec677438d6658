//! The task that owns the client's connection: sends requests, matches replies, forwards
//! deliveries, and reconnects.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use futures_util::{SinkExt, StreamExt};
use std::borrow::Cow;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

use super::held::Held;
use super::incoming::{on_text, End, InFlight, Pending};
use super::open;
use super::open::{Opened, Socket};
use super::outbox::Retries;
use super::renewal::Renewal;
use super::{ClientBuilder, ClientError, Delivery, Op, Reply, Request};
use crate::protocol::{self, Command};

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
        Op::Message(message) => Command::Message {
            room: Cow::Borrowed(&message.room),
            payload: &message.payload,
            key: Some(Cow::Borrowed(&message.key)),
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

pub(super) async fn drive(
    config: ClientBuilder,
    first: Opened,
    mut requests: mpsc::Receiver<Request>,
    deliveries: mpsc::Sender<Delivery>,
    mut queued: VecDeque<(Op, Reply)>,
    connected: Arc<AtomicBool>,
    mut held: Held,
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
        if let Some(mut open) = socket.take() {
            connected.store(true, Ordering::Relaxed);
            let end = session(
                &config,
                &mut open.socket,
                Renewal::new(config.token.as_ref(), open.expires_in),
                std::mem::take(&mut open.missing),
                std::mem::take(&mut open.early),
                &mut requests,
                &deliveries,
                &mut queued,
                &mut next_id,
                &mut held,
            )
            .await;
            connected.store(false, Ordering::Relaxed);
            match end {
                End::Closed => return,
                End::Lost | End::Refused => tracing::debug!("connection lost; reconnecting"),
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
            match open::open(&config, config.url_for(attempt), &mut held).await {
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
    missing: Vec<String>,
    early: Vec<String>,
    requests: &mut mpsc::Receiver<Request>,
    deliveries: &mpsc::Sender<Delivery>,
    queued: &mut VecDeque<(Op, Reply)>,
    next_id: &mut u64,
    held: &mut Held,
) -> End {
    let mut in_flight = InFlight::new();
    let mut retries = Retries::default();
    let end = 'session: {
        // Rooms the server lost go first: subscribed again, each told as a gap unless all
        // was recovered (answered below, like any request; nobody waits for the reply).
        for room in missing {
            let id = *next_id;
            *next_id += 1;
            let frame = Message::text(held.resubscribe_frame(id, &room));
            if write(socket, frame, config.keepalive).await.is_err() {
                break 'session End::Lost;
            }
            in_flight.insert(id, (oneshot::channel().0, Pending::Resubscribe(room)));
        }
        // What waited for the connection goes first, in order (unless its caller gave up).
        while let Some((op, reply)) = queued.pop_front() {
            if reply.is_closed() {
                continue;
            }
            if let Err(unsent) = send(socket, config, &mut in_flight, next_id, op, reply).await {
                queued.push_front(unsent);
                break 'session End::Lost;
            }
        }
        // Frames that came before the `connect` ack, in order.
        for text in early {
            let frame = on_text(
                &text,
                config,
                held,
                deliveries,
                &mut in_flight,
                &mut retries,
            );
            if let Some(end) = frame.await {
                break 'session end;
            }
        }
        // When the server was last heard from, and whether it was pinged since. The timer
        // is moved when it fires, not on every frame.
        let (mut heard, mut pinged) = (Instant::now(), false);
        let silence = tokio::time::sleep(config.keepalive);
        tokio::pin!(silence);
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
                        if let Err(unsent) = send(socket, config, &mut in_flight, next_id, op, reply).await {
                            queued.push_front(unsent);
                            break 'session End::Lost;
                        }
                    }
                },
                () = retries.due() => {
                    let mut due = retries.take().into_iter();
                    while let Some((message, reply)) = due.next() {
                        if reply.is_closed() {
                            // Its caller gave up (its deadline): not sent again.
                            continue;
                        }
                        if let Err((op, reply)) = send(socket, config, &mut in_flight, next_id, Op::Message(message), reply).await {
                            // Not sent: it and the rest go on the next connection, in order
                            // with the messages in flight (below).
                            if let Op::Message(message) = op {
                                retries.later(message, reply);
                            }
                            due.for_each(|(message, reply)| retries.later(message, reply));
                            break 'session End::Lost;
                        }
                    }
                }
                token = renewal.token() => {
                    let (reply, answer) = oneshot::channel();
                    let id = *next_id;
                    *next_id += 1;
                    let frame = protocol::encode(id, &Command::Refresh { token: Cow::Borrowed(&token) });
                    if write(socket, Message::text(frame), config.keepalive).await.is_err() {
                        break 'session End::Lost;
                    }
                    in_flight.insert(id, (reply, Pending::Other));
                    renewal.sent(answer);
                }
                // A connection that went quiet may be dead without a FIN (a NAT forgot it, a
                // laptop slept): ping it, and give it up if that gets no answer either.
                () = &mut silence => {
                    let due = heard + config.keepalive * (1 + u32::from(pinged));
                    if Instant::now() < due {
                        silence.as_mut().reset(due);
                        continue;
                    }
                    if pinged {
                        tracing::debug!("the server did not answer a ping; reconnecting");
                        break 'session End::Lost;
                    }
                    if write(socket, Message::Ping(Default::default()), config.keepalive).await.is_err() {
                        break 'session End::Lost;
                    }
                    pinged = true;
                    silence.as_mut().reset(heard + config.keepalive * 2);
                }
                // Anything from the server (a pong included) says it is there.
                message = socket.next() => match message.inspect(|_| (heard, pinged) = (Instant::now(), false)) {
                    Some(Ok(Message::Text(text))) => {
                        let frame = on_text(&text, config, held, deliveries, &mut in_flight, &mut retries);
                        if let Some(end) = frame.await {
                            break 'session end;
                        }
                    }
                    Some(Ok(Message::Close(Some(close)))) if refused_a_frame(close.code) => {
                        break 'session End::Refused;
                    }
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break 'session End::Lost,
                    Some(Ok(_)) => {}
                },
            }
        }
    };
    // Messages not acked go again first after reconnecting, in the order first sent;
    // anything else in flight may or may not have been applied.
    let mut again = retries.take();
    for (_, (reply, pending)) in in_flight {
        match pending {
            Pending::Message(mut message) if !matches!(end, End::Refused) => {
                message.maybe_published = true;
                again.push((message, reply))
            }
            pending => {
                if let Pending::Unsubscribe(room) = pending {
                    held.maybe_left(room);
                }
                drop(reply.send(Err(ClientError::Disconnected)))
            }
        }
    }
    again.sort_by_key(|(message, _)| message.seq);
    for (message, reply) in again.into_iter().rev() {
        queued.push_front((Op::Message(message), reply));
    }
    end
}

/// Whether a close code says the server refused a frame of ours (RFC 6455 §7.4.1: 1002
/// protocol error, 1003 unacceptable data, 1007 not UTF-8, 1009 too big).
fn refused_a_frame(code: CloseCode) -> bool {
    matches!(
        code,
        CloseCode::Protocol | CloseCode::Unsupported | CloseCode::Invalid | CloseCode::Size
    )
}

/// Sends one request; gives it back when the connection is gone (it goes out again after
/// reconnecting).
async fn send(
    socket: &mut Socket,
    config: &ClientBuilder,
    in_flight: &mut InFlight,
    next_id: &mut u64,
    op: Op,
    reply: Reply,
) -> Result<(), (Op, Reply)> {
    let id = *next_id;
    *next_id += 1;
    match write(socket, Message::text(encode(id, &op)), config.keepalive).await {
        Ok(()) => {
            let pending = match op {
                Op::Subscribe(room) => Pending::Subscribe(room),
                Op::Unsubscribe(room) => Pending::Unsubscribe(room),
                Op::Message(message) => Pending::Message(message),
                _ => Pending::Other,
            };
            if in_flight.len() > SWEEP_ABOVE {
                forget_given_up(in_flight);
            }
            in_flight.insert(id, (reply, pending));
            Ok(())
        }
        Err(()) => Err((op, reply)),
    }
}

/// How many requests in flight make the client look for ones whose callers gave up.
const SWEEP_ABOVE: usize = 1024;

/// Forgets the messages and reads in flight whose callers gave up (their deadline passed):
/// a server that never answers must not make the client hold them all. A late answer to
/// one is ignored. Subscriptions stay: their answer changes the rooms the client holds.
fn forget_given_up(in_flight: &mut InFlight) {
    in_flight.retain(|_, (reply, pending)| {
        !(reply.is_closed() && matches!(pending, Pending::Message(_) | Pending::Other))
    });
}

/// Writes `frame`, or fails if the connection is gone or takes `within` to take it (a
/// connection whose peer stopped reading, or that died without a FIN, once its buffers
/// are full).
async fn write(socket: &mut Socket, frame: Message, within: Duration) -> Result<(), ()> {
    match tokio::time::timeout(within, socket.send(frame)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) | Err(_) => Err(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_whose_callers_gave_up_are_forgotten_but_subscriptions_stay() {
        let mut in_flight = InFlight::new();
        let keys = super::super::outbox::Keys::new();
        let payload = serde_json::value::RawValue::from_string("1".into()).unwrap();
        let message = keys.outgoing("r".into(), payload);
        let (waited, _waiting) = oneshot::channel();
        in_flight.insert(1, (oneshot::channel().0, Pending::Message(message)));
        in_flight.insert(2, (oneshot::channel().0, Pending::Other));
        in_flight.insert(3, (oneshot::channel().0, Pending::Subscribe("r".into())));
        in_flight.insert(4, (waited, Pending::Other));
        forget_given_up(&mut in_flight);
        let mut left: Vec<u64> = in_flight.into_keys().collect();
        left.sort();
        assert_eq!(left, [3, 4]);
    }
}

//! One socket's life: the reader loop that handles the client's frames in order, the writer
//! task that drains the socket's bounded outbound queue, its identity and its rooms.
//!
//! The reader handles one frame at a time: a frame's broker work (subscribe confirmation,
//! publish) finishes before the ack is queued and before the next frame is read, so a
//! socket's publishes reach Redis in the order it sent them. The writer feeds everything
//! queued and flushes once per batch. Deliveries from the hub never wait on this socket:
//! when its queue is full, the hub asks it to close with 1013.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use http::request::Parts;
use hyper_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use hyper_tungstenite::tungstenite::protocol::CloseFrame;
use hyper_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use hyper_tungstenite::{HyperWebsocket, HyperWebsocketStream};
use serde_json::value::RawValue;
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::broker::Unavailable;
use crate::hooks::{
    self, BoxError, ConnectEvent, ConnectVerdict, DisconnectEvent, DisconnectReason, Hooks,
    MessageEvent, MessageVerdict, SocketInfo, SubscribeEvent, UnsubscribeEvent, Verdict,
};
use crate::hub::{Node, Outbox, SocketControl, SocketId};
use crate::protocol::{self, server, Command, ErrorCode};

/// How long a closing socket may take to write its close frame.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Completes the upgrade and runs the socket until it closes.
pub(crate) async fn serve(node: Arc<Node>, upgrade: HyperWebsocket, parts: Parts) {
    let stream = match upgrade.await {
        Ok(stream) => stream,
        Err(e) => {
            tracing::debug!(error = %e, "WebSocket upgrade failed");
            return;
        }
    };
    let control = Arc::new(SocketControl::default());
    let Some(id) = node.rooms.register(control.clone()) else {
        let mut stream = stream;
        let _ = tokio::time::timeout(
            CLOSE_TIMEOUT,
            stream.close(Some(close_frame(CloseCode::Away, "server shutting down"))),
        )
        .await;
        return;
    };
    let span = tracing::debug_span!("socket", id, identity = tracing::field::Empty);
    run(node, stream, parts, id, control).instrument(span).await
}

fn close_frame(code: CloseCode, reason: &'static str) -> CloseFrame {
    CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    }
}

async fn run(
    node: Arc<Node>,
    stream: HyperWebsocketStream,
    parts: Parts,
    id: SocketId,
    control: Arc<SocketControl>,
) {
    let (sink, mut source) = stream.split();
    let (tx, rx) = mpsc::channel(node.config.outbound_queue);
    let mut writer = tokio::spawn(write_loop(sink, rx, control.clone()).in_current_span());
    let identity: Arc<str> = format!("{:016x}-{id}", node.instance).into();
    let hooks = node.config.hooks.clone();
    let mut socket = Socket {
        node,
        id,
        identity,
        bound: false,
        rooms: HashSet::new(),
        outbox: Outbox { tx, control },
        request: Arc::new(parts),
        hooks,
        disconnect_fired: false,
    };
    tracing::debug!("socket open");

    let control = socket.outbox.control.clone();
    let mut writer_done = false;
    // At most one frame read ahead while the previous one is being handled; it is handled
    // next, so frames are still handled one at a time and in order.
    let mut read_ahead: Option<Message> = None;
    let reason = 'socket: loop {
        let message = match read_ahead.take() {
            Some(message) => message,
            None => tokio::select! {
                biased;
                _ = &mut writer, if !writer_done => {
                    writer_done = true;
                    break 'socket DisconnectReason::Server;
                }
                read = source.next() => match read {
                    Some(Ok(message)) => message,
                    other => break 'socket read_end(other, &control),
                },
            },
        };
        match message {
            Message::Text(text) => {
                // Keep watching the socket while the frame is handled (hooks and the broker
                // may take a while): a socket that ends meanwhile stops the handling, and
                // its cleanup undoes whatever the handling had begun.
                let handling = socket.on_text(&text);
                tokio::pin!(handling);
                loop {
                    tokio::select! {
                        biased;
                        () = &mut handling => break,
                        _ = &mut writer, if !writer_done => {
                            writer_done = true;
                            break 'socket DisconnectReason::Server;
                        }
                        read = source.next(), if read_ahead.is_none() => match read {
                            Some(Ok(Message::Close(_))) => break 'socket DisconnectReason::Closed,
                            Some(Ok(message)) => read_ahead = Some(message),
                            other => break 'socket read_end(other, &control),
                        },
                    }
                }
            }
            Message::Binary(_) => {
                socket
                    .reply(server::error(
                        None,
                        ErrorCode::InvalidFrame,
                        "binary frames are not supported: send JSON in text frames",
                    ))
                    .await
            }
            Message::Close(_) => break DisconnectReason::Closed,
            // tungstenite answers pings itself.
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
        }
    };

    let mut socket = socket.leave_all();
    socket.fire_disconnect(reason).await;
    let Socket {
        node, id, outbox, ..
    } = socket;
    // With every hub clone of the sender gone, the writer drains what is queued, closes
    // the socket and ends.
    drop(outbox);
    if !writer_done {
        let _ = writer.await;
    }
    // Only now, so that a node waiting for its sockets to close also waits for the flush.
    node.rooms.unregister(id);
    tracing::debug!(?reason, "socket closed");
}

/// What the end of the socket's stream (or a read error) means.
fn read_end(read: Option<Result<Message, WsError>>, control: &SocketControl) -> DisconnectReason {
    match read {
        None | Some(Ok(_)) => DisconnectReason::Closed,
        Some(Err(WsError::Capacity(e))) => {
            tracing::debug!(error = %e, "frame over the size limit");
            control.request_close(CloseCode::Size, "frame too large");
            DisconnectReason::Server
        }
        Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed)) => DisconnectReason::Closed,
        Some(Err(e)) => {
            tracing::debug!(error = %e, "socket read failed");
            DisconnectReason::Lost
        }
    }
}

/// The reader side's state of one socket.
struct Socket {
    node: Arc<Node>,
    id: SocketId,
    /// The bound `connectionID`, or a server-generated one until `connect`.
    identity: Arc<str>,
    /// Whether the client bound an identity with `connect` (its rooms are then recorded).
    bound: bool,
    rooms: HashSet<Arc<str>>,
    outbox: Outbox,
    /// The upgrade request's head, shared with every hook event.
    request: Arc<Parts>,
    /// This socket's own clones of the layer's hooks.
    hooks: Hooks,
    disconnect_fired: bool,
}

/// A refused operation: the code and message of the `error` frame.
type Refusal = (ErrorCode, String);

fn unavailable(e: Unavailable) -> Refusal {
    (ErrorCode::Unavailable, e.0)
}

fn forbidden(reason: String) -> Refusal {
    (ErrorCode::Forbidden, reason)
}

fn hook_failed(event: &'static str, e: BoxError) -> Refusal {
    tracing::warn!(event, error = %e, "hook failed; refusing");
    (
        ErrorCode::Internal,
        format!("the server could not decide on this {event}"),
    )
}

impl Socket {
    /// Queues a frame for this socket, waiting if its queue is full.
    async fn reply(&self, frame: String) {
        // Fails only when the writer has stopped, and then the reader stops too.
        let _ = self.outbox.tx.send(Utf8Bytes::from(frame)).await;
    }

    fn info(&self) -> SocketInfo {
        SocketInfo {
            id: self.id,
            connection_id: self.identity.clone(),
            bound: self.bound,
            request: self.request.clone(),
        }
    }

    async fn on_text(&mut self, text: &str) {
        let frame = match protocol::parse(text, &self.node.config.limits) {
            Ok(frame) => frame,
            Err(e) => {
                tracing::debug!(code = %e.code, message = %e.message, "refused a frame");
                return self
                    .reply(server::error(e.message_id, e.code, &e.message))
                    .await;
            }
        };
        let message_id = frame.message_id;
        let result = match frame.command {
            Command::Connect { connection_id } => self.connect(&connection_id).await,
            Command::Subscribe { room } => self.subscribe(&room).await,
            Command::Unsubscribe { room } => self.unsubscribe(&room).await,
            Command::Message { room, payload } => self.publish(&room, payload).await,
            Command::Disconnect => {
                self.fire_disconnect(DisconnectReason::Requested).await;
                self.leave_rooms();
                Ok(())
            }
        };
        let reply = match result {
            Ok(()) => server::ack(message_id),
            Err((code, message)) => server::error(Some(message_id), code, &message),
        };
        self.reply(reply).await
    }

    async fn connect(&mut self, claimed: &str) -> Result<(), Refusal> {
        let mut connection_id = claimed.to_owned();
        let info = self.hooks.connect.is_some().then(|| self.info());
        if let (Some(hook), Some(info)) = (&mut self.hooks.connect, info) {
            let event = ConnectEvent {
                socket: info,
                connection_id: claimed.to_owned(),
            };
            match hooks::call(hook, event).await {
                Ok(ConnectVerdict::Accept) => {}
                Ok(ConnectVerdict::Assign(id)) => connection_id = id,
                Ok(ConnectVerdict::Refuse(reason)) => return Err(forbidden(reason)),
                Err(e) => return Err(hook_failed("connect", e)),
            }
            if connection_id.is_empty() {
                return Err(hook_failed("connect", "assigned an empty identity".into()));
            }
        }
        if self.bound && *self.identity != *connection_id {
            return Err((
                ErrorCode::InvalidMessage,
                "this socket is already connected with another connectionID".into(),
            ));
        }
        let rooms = self
            .node
            .broker
            .rooms_of(&connection_id)
            .await
            .map_err(unavailable)?;
        if !self.bound {
            tracing::Span::current().record("identity", connection_id.as_str());
            self.identity = connection_id.into();
            self.bound = true;
        }
        for room in rooms {
            match self.allowed_to_subscribe(&room).await {
                Ok(()) => {}
                Err((ErrorCode::Forbidden, reason)) => {
                    tracing::debug!(room, reason, "subscribe hook refused a recorded room");
                    continue;
                }
                Err(refusal) => return Err(refusal),
            }
            self.join(&room).await.map_err(unavailable)?;
        }
        Ok(())
    }

    async fn allowed_to_subscribe(&mut self, room: &str) -> Result<(), Refusal> {
        let info = self.hooks.subscribe.is_some().then(|| self.info());
        if let (Some(hook), Some(info)) = (&mut self.hooks.subscribe, info) {
            let event = SubscribeEvent {
                socket: info,
                room: room.to_owned(),
            };
            match hooks::call(hook, event).await {
                Ok(Verdict::Allow) => {}
                Ok(Verdict::Refuse(reason)) => return Err(forbidden(reason)),
                Err(e) => return Err(hook_failed("subscribe", e)),
            }
        }
        Ok(())
    }

    async fn subscribe(&mut self, room: &str) -> Result<(), Refusal> {
        self.allowed_to_subscribe(room).await?;
        let joined = self.join(room).await.map_err(unavailable)?;
        if self.bound {
            if let Err(e) = self.node.broker.record(&self.identity, room).await {
                if joined {
                    self.leave(room);
                }
                return Err(unavailable(e));
            }
        }
        Ok(())
    }

    async fn unsubscribe(&mut self, room: &str) -> Result<(), Refusal> {
        let info = self.hooks.unsubscribe.is_some().then(|| self.info());
        if let (Some(hook), Some(info)) = (&mut self.hooks.unsubscribe, info) {
            let event = UnsubscribeEvent {
                socket: info,
                room: room.to_owned(),
            };
            match hooks::call(hook, event).await {
                Ok(Verdict::Allow) => {}
                Ok(Verdict::Refuse(reason)) => return Err(forbidden(reason)),
                Err(e) => return Err(hook_failed("unsubscribe", e)),
            }
        }
        if self.bound {
            self.node
                .broker
                .forget(&self.identity, room)
                .await
                .map_err(unavailable)?;
        }
        self.leave(room);
        Ok(())
    }

    async fn publish(&mut self, room: &str, payload: &RawValue) -> Result<(), Refusal> {
        let mut replaced = None;
        let info = self.hooks.message.is_some().then(|| self.info());
        if let (Some(hook), Some(info)) = (&mut self.hooks.message, info) {
            let event = MessageEvent {
                socket: info,
                room: room.to_owned(),
                payload: payload.to_owned(),
            };
            match hooks::call(hook, event).await {
                Ok(MessageVerdict::Allow) => {}
                Ok(MessageVerdict::Replace(payload)) => replaced = Some(payload),
                Ok(MessageVerdict::Refuse(reason)) => return Err(forbidden(reason)),
                Err(e) => return Err(hook_failed("message", e)),
            }
        }
        let payload = replaced.as_deref().unwrap_or(payload);
        let frame = server::delivery(room, &self.identity, payload);
        self.node
            .broker
            .publish(room, Utf8Bytes::from(frame))
            .await
            .map_err(unavailable)
    }

    /// Calls the `disconnect` hook, once per socket.
    async fn fire_disconnect(&mut self, reason: DisconnectReason) {
        if self.disconnect_fired {
            return;
        }
        self.disconnect_fired = true;
        let info = self.hooks.disconnect.is_some().then(|| self.info());
        if let (Some(hook), Some(info)) = (&mut self.hooks.disconnect, info) {
            let event = DisconnectEvent {
                socket: info,
                reason,
            };
            if let Err(e) = hooks::call(hook, event).await {
                tracing::warn!(error = %e, "disconnect hook failed");
            }
        }
    }

    /// Joins `room` on this node; returns whether the socket was not a member before. On
    /// `Ok`, every frame published to the room from now on reaches this socket.
    ///
    /// Cancel-safe: once the broker was asked, the room is in `self.rooms`, so the socket's
    /// cleanup gives the acquisition back even if this future is dropped mid-way.
    async fn join(&mut self, room: &str) -> Result<bool, Unavailable> {
        if self.rooms.contains(room) {
            return Ok(false);
        }
        // Become a local member first, so that nothing published after the broker
        // confirms the subscription can slip past this socket.
        let key = self.node.rooms.join(room, self.id, &self.outbox);
        let acquired = self.node.broker.acquire(&key);
        self.rooms.insert(key.clone());
        match acquired.wait().await {
            Ok(()) => Ok(true),
            Err(e) => {
                self.leave(&key);
                Err(e)
            }
        }
    }

    fn leave(&mut self, room: &str) {
        if let Some(key) = self.rooms.take(room) {
            self.node.rooms.leave(&key, self.id);
            self.node.broker.release(&key);
        }
    }

    fn leave_rooms(&mut self) {
        for key in std::mem::take(&mut self.rooms) {
            self.node.rooms.leave(&key, self.id);
            self.node.broker.release(&key);
        }
    }

    fn leave_all(mut self) -> Self {
        self.leave_rooms();
        self
    }
}

type WsSink = SplitSink<HyperWebsocketStream, Message>;

/// Drains the outbound queue into the socket: everything queued is fed, then flushed once.
/// Ends when the queue closes, a write fails, or a close is requested.
async fn write_loop(
    mut sink: WsSink,
    mut rx: mpsc::Receiver<Utf8Bytes>,
    control: Arc<SocketControl>,
) {
    loop {
        let first = tokio::select! {
            biased;
            close = control.close_requested() => return send_close(sink, rx, close).await,
            frame = rx.recv() => match frame {
                Some(frame) => frame,
                None => {
                    let _ = tokio::time::timeout(CLOSE_TIMEOUT, sink.close()).await;
                    return;
                }
            },
        };
        let closing = tokio::select! {
            biased;
            close = control.close_requested() => Some(close),
            written = write_batch(&mut sink, &mut rx, first) => match written {
                Ok(()) => None,
                Err(e) => {
                    tracing::debug!(error = %e, "socket write failed");
                    return;
                }
            },
        };
        if let Some(close) = closing {
            return send_close(sink, rx, close).await;
        }
    }
}

async fn write_batch(
    sink: &mut WsSink,
    rx: &mut mpsc::Receiver<Utf8Bytes>,
    first: Utf8Bytes,
) -> Result<(), WsError> {
    sink.feed(Message::Text(first)).await?;
    while let Ok(frame) = rx.try_recv() {
        sink.feed(Message::Text(frame)).await?;
    }
    sink.flush().await
}

async fn send_close(
    mut sink: WsSink,
    mut rx: mpsc::Receiver<Utf8Bytes>,
    (code, reason): (CloseCode, &'static str),
) {
    tracing::debug!(code = u16::from(code), reason, "closing socket");
    let close = async {
        // Going away is graceful: what was queued still goes out first. A slow reader's
        // backlog is dropped.
        if code == CloseCode::Away {
            while let Ok(frame) = rx.try_recv() {
                sink.feed(Message::Text(frame)).await?;
            }
        }
        rx.close();
        sink.send(Message::Close(Some(close_frame(code, reason))))
            .await
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, close).await;
}

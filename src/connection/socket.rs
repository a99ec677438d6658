//! The reader side of one socket: its identity, its rooms, and the handling of each frame.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use http::request::Parts;
use hyper_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use hyper_tungstenite::tungstenite::Utf8Bytes;
use serde_json::value::RawValue;
use tokio::time::Instant;

use super::rate_limit::{Rate, RateLimit};
use crate::broker::{Publish, Unavailable};
use crate::hooks::{
    self, BoxError, ConnectEvent, ConnectVerdict, DisconnectEvent, DisconnectReason, Hooks,
    MessageEvent, MessageVerdict, SocketInfo, SubscribeEvent, UnsubscribeEvent, Verdict,
};
use crate::hub::{Node, Outbox, SocketId};
use crate::metrics::SocketMetrics;
use crate::protocol::{self, server, Command, ErrorCode};

/// The reader side's state of one socket.
pub(super) struct Socket {
    pub(super) node: Arc<Node>,
    pub(super) id: SocketId,
    /// The bound `connectionID`, or a server-generated one until `connect`.
    identity: Arc<str>,
    /// Whether the client bound an identity with `connect` (its rooms are then recorded).
    bound: bool,
    rooms: HashSet<Arc<str>>,
    pub(super) outbox: Outbox,
    /// The upgrade request's head, shared with every hook event.
    request: Arc<Parts>,
    /// This socket's own clones of the layer's hooks.
    hooks: Hooks,
    disconnect_fired: bool,
    rate: Option<RateLimit>,
    metrics: SocketMetrics,
    /// Publishes queued at the broker whose ack is not sent yet, oldest first.
    in_flight: VecDeque<InFlight>,
}

/// One publish awaiting the broker's answer.
struct InFlight {
    message_id: Box<RawValue>,
    started: Instant,
    publish: Publish,
}

/// How many publishes one socket may have in flight before it waits for the oldest.
const MAX_IN_FLIGHT: usize = 64;

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

/// The upgrade request's head with its URI and headers copied into allocations of their own.
///
/// hyper parses a request head as slices of the connection's read buffer (8 KiB or more), so
/// keeping the parsed head for a socket's life kept that whole buffer alive: about 5 KiB of
/// RSS per idle socket with hooks set. The copy costs a few hundred bytes. Extensions are
/// moved as they are.
fn detach(parts: Parts) -> Parts {
    let mut head = http::Request::new(()).into_parts().0;
    head.method = parts.method;
    head.version = parts.version;
    head.uri = http::Uri::try_from(parts.uri.to_string()).unwrap_or(parts.uri);
    head.headers.reserve(parts.headers.len());
    for (name, value) in &parts.headers {
        let Ok(mut copy) = http::HeaderValue::from_bytes(value.as_bytes()) else {
            continue;
        };
        copy.set_sensitive(value.is_sensitive());
        head.headers.append(name.clone(), copy);
    }
    head.extensions = parts.extensions;
    head
}

impl Socket {
    pub(super) fn new(node: Arc<Node>, id: SocketId, outbox: Outbox, request: Parts) -> Self {
        let identity: Arc<str> = format!("{:016x}-{id}", node.instance).into();
        let hooks = node.config.hooks.clone();
        let hooks_set = !hooks.is_empty();
        let rate = RateLimit::new(node.config.rate, Instant::now());
        Socket {
            node,
            id,
            identity,
            bound: false,
            rooms: HashSet::new(),
            outbox,
            // Only hooks read the upgrade request: without them, don't keep its headers for
            // the socket's whole life.
            request: Arc::new(match hooks_set {
                true => detach(request),
                false => http::Request::new(()).into_parts().0,
            }),
            hooks,
            disconnect_fired: false,
            rate,
            metrics: SocketMetrics::new(),
            in_flight: VecDeque::new(),
        }
    }

    pub(super) fn metrics(&self) -> &SocketMetrics {
        &self.metrics
    }

    /// Queues a frame for this socket, waiting if its queue is full.
    async fn reply(&self, frame: String) {
        // Fails only when the writer has stopped, and then the reader stops too.
        let _ = self.outbox.control.push(Utf8Bytes::from(frame)).await;
    }

    pub(super) async fn reply_error(
        &self,
        message_id: Option<&RawValue>,
        code: ErrorCode,
        message: &str,
    ) {
        crate::metrics::error(code);
        self.reply(server::error(message_id, code, message)).await
    }

    /// Applies the rate limit to one incoming frame; `false` when it must be refused.
    /// A sustained flood closes the socket with 1008.
    fn within_rate(&mut self) -> bool {
        let Some(rate) = &mut self.rate else {
            return true;
        };
        match rate.check(Instant::now()) {
            Rate::Allowed => true,
            Rate::Limited => false,
            Rate::Flood => {
                tracing::debug!("flood: closing the socket");
                self.outbox
                    .control
                    .request_close(CloseCode::Policy, "too many frames");
                false
            }
        }
    }

    /// Handles a binary frame: refused, the socket stays open.
    pub(super) async fn on_binary(&mut self) {
        self.settle_all().await;
        if !self.within_rate() {
            return self
                .reply_error(None, ErrorCode::RateLimited, "too many frames: slow down")
                .await;
        }
        self.reply_error(
            None,
            ErrorCode::InvalidFrame,
            "binary frames are not supported: send JSON in text frames",
        )
        .await
    }

    fn info(&self) -> SocketInfo {
        SocketInfo {
            id: self.id,
            connection_id: self.identity.clone(),
            bound: self.bound,
            request: self.request.clone(),
        }
    }

    pub(super) async fn on_text(&mut self, text: &str) {
        let allowed = self.within_rate();
        let frame = match protocol::parse(text, &self.node.config.limits) {
            Ok(frame) => frame,
            Err(e) => {
                tracing::debug!(code = %e.code, message = %e.message, "refused a frame");
                let (code, message) = match allowed {
                    true => (e.code, &*e.message),
                    false => (ErrorCode::RateLimited, "too many frames: slow down"),
                };
                self.settle_all().await;
                return self.reply_error(e.message_id, code, message).await;
            }
        };
        let message_id = frame.message_id;
        if !allowed {
            self.settle_all().await;
            return self
                .reply_error(
                    Some(message_id),
                    ErrorCode::RateLimited,
                    "too many frames: slow down",
                )
                .await;
        }
        if let Command::Message { room, payload } = &frame.command {
            // Acked later, when the broker answers; only a refusal is answered now, after
            // the replies of the publishes before it.
            if let Err((code, message)) = self.publish(message_id, room, payload).await {
                self.settle_all().await;
                self.reply_error(Some(message_id), code, &message).await;
            }
            return;
        }
        // Anything else waits for the publishes before it, so that replies keep the order
        // of the frames.
        self.settle_all().await;
        let result = match frame.command {
            Command::Connect { connection_id } => self.connect(&connection_id).await,
            Command::Subscribe { room } => self.subscribe(&room).await,
            Command::Unsubscribe { room } => self.unsubscribe(&room).await,
            Command::Message { .. } => Ok(()),
            Command::Disconnect => {
                self.fire_disconnect(DisconnectReason::Requested).await;
                self.leave_rooms();
                Ok(())
            }
        };
        match result {
            Ok(()) => self.reply(server::ack(message_id)).await,
            Err((code, message)) => self.reply_error(Some(message_id), code, &message).await,
        }
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
            self.join(&room).await?;
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
        let joined = self.join(room).await?;
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

    /// Queues a publish; its ack (or error) is sent when the broker answers, in order with
    /// the socket's other replies (see [`Socket::settle_front`]).
    async fn publish(
        &mut self,
        message_id: &RawValue,
        room: &str,
        payload: &RawValue,
    ) -> Result<(), Refusal> {
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
        // Queued at the broker now, in this socket's order; several may be in flight.
        let publish = self
            .node
            .broker
            .publish(room, Utf8Bytes::from(frame), self.id);
        self.in_flight.push_back(InFlight {
            message_id: message_id.to_owned(),
            started: Instant::now(),
            publish,
        });
        if self.in_flight.len() > MAX_IN_FLIGHT {
            self.settle_front().await;
        }
        Ok(())
    }

    /// Whether publishes await the broker's answer.
    pub(super) fn has_in_flight(&self) -> bool {
        !self.in_flight.is_empty()
    }

    /// Waits for the broker's answer to the oldest publish in flight (cancel-safe: nothing
    /// is taken off the queue).
    pub(super) async fn front_published(&mut self) {
        match self.in_flight.front_mut() {
            Some(front) => {
                let _ = front.publish.result().await;
            }
            None => std::future::pending().await,
        }
    }

    /// Sends the ack or error of the oldest publish in flight, once the broker answered.
    pub(super) async fn settle_front(&mut self) {
        let Some(front) = self.in_flight.front_mut() else {
            return;
        };
        let result = front.publish.result().await;
        let Some(front) = self.in_flight.pop_front() else {
            return;
        };
        match result {
            Ok(()) => {
                self.metrics.publishes.increment(1);
                self.metrics
                    .publish_duration
                    .record(front.started.elapsed());
                self.reply(server::ack(&front.message_id)).await
            }
            Err(e) => {
                let (code, message) = unavailable(e);
                self.reply_error(Some(&front.message_id), code, &message)
                    .await
            }
        }
    }

    /// Sends the replies of every publish in flight, so that what follows comes after.
    async fn settle_all(&mut self) {
        while self.has_in_flight() {
            self.settle_front().await;
        }
    }

    /// Calls the `disconnect` hook, once per socket.
    pub(super) async fn fire_disconnect(&mut self, reason: DisconnectReason) {
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
    async fn join(&mut self, room: &str) -> Result<bool, Refusal> {
        if self.rooms.contains(room) {
            return Ok(false);
        }
        let max = self.node.config.max_rooms_per_socket;
        if self.rooms.len() >= max {
            return Err((
                ErrorCode::LimitExceeded,
                format!("a socket may be in at most {max} rooms"),
            ));
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
                Err(unavailable(e))
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

    pub(super) fn leave_all(mut self) -> Self {
        self.leave_rooms();
        self
    }
}

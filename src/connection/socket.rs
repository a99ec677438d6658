//! The reader side of one socket: its identity, its rooms, and the handling of each frame.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::SystemTime;

use http::request::Parts;
use http::Extensions;
use hyper_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use hyper_tungstenite::tungstenite::Utf8Bytes;
use serde_json::value::RawValue;

mod answer;
mod history;
mod identity;
mod presence;

use self::answer::Answer;
use super::in_flight::{Answered, InFlight};
use super::outbound::OutboundQueue;
use super::refusal::Refusal;
use super::request_head::detach;
use crate::broker::{Once, Position};
use crate::hooks::{
    ask, BoxError, DisconnectEvent, DisconnectReason, Happened, MessageEvent, MessageVerdict,
    SocketHooks, SocketInfo, SubscribeEvent, UnsubscribeEvent, Verdict,
};
use crate::metrics::SocketCounts;
use crate::node::Node;
use crate::protocol::{self, server, Command, ErrorCode};
use crate::rooms::{SharedMember, SocketId};
use crate::settings::Presence;

/// The reader side's state of one socket.
pub(super) struct Socket {
    pub(super) node: Arc<Node>,
    me: Me,
    rooms: HashSet<Arc<str>>,
    /// The presence rooms the socket is counted in, with the identity it is counted under.
    present: HashMap<Arc<str>, (Arc<str>, Presence)>,
    queue: Arc<OutboundQueue>,
    /// This socket's own clones of the layer's hooks.
    hooks: SocketHooks,
    disconnect_fired: bool,
    metrics: Arc<SocketCounts>,
    in_flight: InFlight,
    /// When the socket's grant ends (it is then closed), unless a `refresh` renews it.
    expires_at: Option<SystemTime>,
    /// Whether the socket holds its bound identity at the broker (see
    /// [`Socket::release_identity`]).
    holds_identity: bool,
    /// While a `connect` rejoins rooms under the identity it binds: who the socket was
    /// before, which is what the `disconnect` hook is told if the socket ends meanwhile
    /// (the `connect` never succeeded). Boxed: it is there for a moment only.
    connecting_from: Option<Box<Before>>,
}

/// A socket's identity, whether it is bound, and its grant, as they were.
type Before = (Arc<str>, bool, Arc<Extensions>);

/// What hooks are told about the socket.
struct Me {
    id: SocketId,
    /// The bound `connectionID`, or a server-generated one until `connect`.
    identity: Arc<str>,
    /// Whether the client bound an identity with `connect` (its rooms are then recorded).
    bound: bool,
    /// The upgrade request's head, shared with every hook event.
    request: Arc<Parts>,
    /// What the `connect` or `refresh` hook granted (empty until then).
    granted: Arc<Extensions>,
}

impl Me {
    fn info(&self) -> SocketInfo {
        SocketInfo {
            id: self.id,
            connection_id: self.identity.clone(),
            bound: self.bound,
            request: self.request.clone(),
            granted: self.granted.clone(),
        }
    }
}

/// What the subscribe hook's answer (`None`: no hook is set) means for a subscription.
fn subscribe_verdict(verdict: Option<Result<Verdict, BoxError>>) -> Result<(), Refusal> {
    match verdict {
        None | Some(Ok(Verdict::Allow)) => Ok(()),
        Some(Ok(Verdict::Refuse(reason))) => Err(Refusal::Forbidden(reason)),
        Some(Err(e)) => Err(Refusal::hook_failed("subscribe", e)),
    }
}

/// An `error` frame, counted in the errors metric.
fn error_frame(message_id: Option<&RawValue>, code: ErrorCode, message: &str) -> String {
    crate::metrics::error(code);
    server::error(message_id, code, message)
}

/// The empty request head every socket shares when no hook would read its own.
static NO_REQUEST: std::sync::LazyLock<Arc<Parts>> =
    std::sync::LazyLock::new(|| Arc::new(http::Request::new(()).into_parts().0));

impl Socket {
    pub(super) fn new(
        node: Arc<Node>,
        id: SocketId,
        queue: Arc<OutboundQueue>,
        request: Parts,
    ) -> Self {
        let identity: Arc<str> = format!("{:016x}-{id}", node.instance).into();
        let hooks = SocketHooks::new(&node.config.hooks);
        let metrics = Arc::new(SocketCounts::new(node.socket_metrics()));
        // Only hooks read the upgrade request: without them, don't keep its headers for the
        // socket's whole life.
        let request = match hooks.is_empty() {
            false => Arc::new(detach(request)),
            true => NO_REQUEST.clone(),
        };
        Socket {
            node,
            me: Me {
                id,
                identity,
                bound: false,
                request,
                granted: Arc::default(),
            },
            rooms: HashSet::new(),
            present: HashMap::new(),
            queue,
            hooks,
            disconnect_fired: false,
            metrics,
            in_flight: InFlight::default(),
            expires_at: None,
            holds_identity: false,
            connecting_from: None,
        }
    }

    /// The socket's slot on the node.
    pub(super) fn id(&self) -> SocketId {
        self.me.id
    }

    /// When the socket's grant ends, if it does.
    pub(super) fn expires_at(&self) -> Option<SystemTime> {
        self.expires_at
    }

    /// Whether the socket's grant has ended.
    fn expired(&self) -> bool {
        self.expires_at.is_some_and(|at| at <= SystemTime::now())
    }

    /// Whether a `connect` bound an identity.
    pub(super) fn is_bound(&self) -> bool {
        self.me.bound
    }

    pub(super) fn metrics(&self) -> &Arc<SocketCounts> {
        &self.metrics
    }

    /// Asks the writer to close the socket with `code` after what is queued.
    pub(super) fn close(&self, code: CloseCode, reason: &'static str) {
        self.queue.request_close(code, reason);
    }

    /// Queues a frame for this socket, waiting if its queue is full.
    async fn reply(&self, frame: String) {
        // Fails only when the writer has stopped, and then the reader stops too.
        let _ = self.queue.push(Utf8Bytes::from(frame)).await;
    }

    async fn reply_error(&self, message_id: Option<&RawValue>, code: ErrorCode, message: &str) {
        self.reply(error_frame(message_id, code, message)).await
    }

    async fn refuse(&self, message_id: &RawValue, refusal: Refusal) {
        self.reply_error(Some(message_id), refusal.code(), &refusal.message())
            .await
    }

    /// Handles a binary frame: refused, the socket stays open.
    pub(super) async fn on_binary(&mut self, allowed: bool) {
        self.settle_all().await;
        let (code, message) = match allowed {
            false => (ErrorCode::RateLimited, "too many frames: slow down"),
            true => (
                ErrorCode::InvalidFrame,
                "binary frames are not supported: send JSON in text frames",
            ),
        };
        self.reply_error(None, code, message).await
    }

    /// Handles a text frame; `allowed` is the rate limit's verdict, taken when it arrived.
    pub(super) async fn on_text(&mut self, text: &str, allowed: bool) {
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
        if self.expired() && !matches!(frame.command, Command::Refresh { .. }) {
            // Past its deadline the socket is closed shortly; until then it may only renew.
            self.settle_all().await;
            return self
                .reply_error(
                    Some(message_id),
                    ErrorCode::Forbidden,
                    "the socket's credential expired: send refresh with a new one",
                )
                .await;
        }
        if let Command::Message { room, payload, key } = &frame.command {
            // Acked later, when the broker answers; only a refusal is answered now, after
            // the replies of the publishes before it.
            if let Err(refusal) = self
                .publish(message_id, room, payload, key.as_deref())
                .await
            {
                self.settle_all().await;
                self.refuse(message_id, refusal).await;
            }
            return;
        }
        // Anything else waits for the publishes before it, so that replies keep the order
        // of the frames. Boxed: these operations' futures are large (hooks, several broker
        // round trips), and inline they would make every frame's handling future, messages'
        // included, that large (it is allocated and moved for each frame).
        self.settle_all().await;
        Box::pin(self.command(message_id, frame.command)).await
    }

    /// Handles every operation but `message`, and sends its reply.
    async fn command(&mut self, message_id: &RawValue, command: Command<'_>) {
        let grants = matches!(command, Command::Connect { .. } | Command::Refresh { .. });
        let result = match command {
            Command::Connect {
                connection_id,
                token,
                since,
            } => self.connect(&connection_id, token.as_deref(), since).await,
            Command::Subscribe { room, since } => match since {
                Some(since) => self.subscribe_since(&room, &since).await,
                None => self.subscribe(&room).await.map(Answer::at),
            },
            Command::Unsubscribe { room } => self.unsubscribe(&room).await.map(|()| Answer::Ack),
            Command::History {
                room,
                limit,
                before,
            } => self.history(&room, limit, before).await,
            Command::Presence { room } => self.presence(&room).await,
            Command::Refresh { token } => self.refresh(&token).await,
            Command::Disconnect => {
                self.fire_disconnect(DisconnectReason::Requested).await;
                self.leave_all();
                Ok(Answer::Ack)
            }
            // Handled above.
            Command::Message { .. } => Ok(Answer::Ack),
        };
        match result {
            Ok(answer) => {
                let mut frame = answer.frame(message_id);
                if let (true, Some(at)) = (grants, self.expires_at) {
                    let left = at.duration_since(SystemTime::now()).unwrap_or_default();
                    frame = server::with_expires_in(frame, left.as_secs());
                }
                self.reply(frame).await;
                answer.follow_up(&self.queue).await;
            }
            Err(refusal) => self.refuse(message_id, refusal).await,
        }
    }

    async fn allowed_to_subscribe(&mut self, room: &str) -> Result<(), Refusal> {
        let verdict = ask(self.hooks.get(|h| &mut h.subscribe), || SubscribeEvent {
            socket: self.me.info(),
            room: room.to_owned(),
        });
        subscribe_verdict(verdict.await)
    }

    /// Joins `room` (and records it for a bound identity); for a room with history, says
    /// where its history stands.
    async fn subscribe(&mut self, room: &str) -> Result<Option<Position>, Refusal> {
        self.allowed_to_subscribe(room).await?;
        self.identity_has_room_for(room).await?;
        let joined = self.join(room).await?;
        let undo = |socket: &mut Self, refusal| {
            if joined {
                socket.leave(room);
            }
            Err(refusal)
        };
        let top = match self.node.config.rooms.settings(room).history {
            None => None,
            Some(history) => match self.node.broker.top(room, history).await {
                Ok(top) => Some(top),
                Err(e) => return undo(self, Refusal::BrokerRead(e)),
            },
        };
        if self.me.bound {
            let max = self.node.config.max_rooms_per_socket;
            match self.node.broker.record(&self.me.identity, room, max).await {
                Ok(true) => {}
                Ok(false) => return undo(self, Refusal::IdentityFull(max)),
                Err(e) => return undo(self, Refusal::Broker(e)),
            }
        }
        Ok(top)
    }

    /// Refuses a room the bound identity's record has no place for, before the socket
    /// joins it: a refused subscribe must change nothing, and joining then leaving shows
    /// the room's members a `join` and a `leave`. (Recorded after the join, as before:
    /// a record made first could only be taken back by forgetting one that another socket
    /// of the identity may hold. Should the record fill up in between, the join is left
    /// again.)
    async fn identity_has_room_for(&self, room: &str) -> Result<(), Refusal> {
        if !self.me.bound || self.rooms.contains(room) {
            return Ok(());
        }
        let max = self.node.config.max_rooms_per_socket;
        match self.node.broker.fits(&self.me.identity, room, max).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(Refusal::IdentityFull(max)),
            Err(e) => Err(Refusal::BrokerRead(e)),
        }
    }

    async fn unsubscribe(&mut self, room: &str) -> Result<(), Refusal> {
        let verdict = ask(self.hooks.get(|h| &mut h.unsubscribe), || {
            UnsubscribeEvent {
                socket: self.me.info(),
                room: room.to_owned(),
            }
        });
        match verdict.await {
            None | Some(Ok(Verdict::Allow)) => {}
            Some(Ok(Verdict::Refuse(reason))) => return Err(Refusal::Forbidden(reason)),
            Some(Err(e)) => return Err(Refusal::hook_failed("unsubscribe", e)),
        }
        if self.me.bound {
            self.node
                .broker
                .forget(&self.me.identity, room)
                .await
                .map_err(Refusal::Broker)?;
        }
        self.exit_presence_confirmed(room).await;
        self.leave(room);
        Ok(())
    }

    /// Queues a publish; its ack (or error) is sent when the broker answers, in order with
    /// the socket's other replies (see [`Socket::settle_oldest`]).
    async fn publish(
        &mut self,
        message_id: &RawValue,
        room: &str,
        payload: &RawValue,
        key: Option<&str>,
    ) -> Result<(), Refusal> {
        let verdict = ask(self.hooks.get(|h| &mut h.message), || MessageEvent {
            socket: self.me.info(),
            room: room.to_owned(),
            payload: payload.to_owned(),
        });
        let replaced = match verdict.await {
            None | Some(Ok(MessageVerdict::Allow)) => None,
            Some(Ok(MessageVerdict::Replace(payload))) => Some(payload),
            Some(Ok(MessageVerdict::Refuse(reason))) => return Err(Refusal::Forbidden(reason)),
            Some(Err(e)) => return Err(Refusal::hook_failed("message", e)),
        };
        if let Some(replaced) = &replaced {
            // A payload no client could send (too large, too deep, unreadable by a JSON
            // parser) is the hook's mistake: delivered, clients would drop it.
            let limits = &self.node.config.limits;
            let problem = match replaced.get() {
                p if p.len() > self.node.config.max_frame_size => {
                    Some("the replaced payload is over the frame size limit")
                }
                p => protocol::payload_problem(p, limits.max_payload_depth),
            };
            if let Some(problem) = problem {
                let e = std::io::Error::other(problem);
                return Err(Refusal::hook_failed("message", e.into()));
            }
        }
        let payload = replaced.as_deref().unwrap_or(payload);
        let frame = server::delivery(room, &self.me.identity, payload);
        // Queued at the broker now, in this socket's order; several may be in flight.
        let settings = self.node.config.rooms.settings(room);
        // The key names the message for this identity (a socket that never sent `connect`
        // has one of its own) in this room, for the room's window.
        let once = Once::in_room(&settings, &self.me.identity, false, key);
        let publish = (self.node.broker).publish(room, frame, self.me.id, settings.history, once);
        self.in_flight.push(message_id.to_owned(), publish);
        if self.in_flight.is_full() {
            self.settle_oldest().await;
        }
        Ok(())
    }

    /// Whether a publish waits for the broker's answer.
    pub(super) fn has_in_flight(&self) -> bool {
        !self.in_flight.is_empty()
    }

    /// Waits until the broker answered the oldest publish in flight (never, while none is).
    /// Cancel-safe.
    pub(super) async fn oldest_answered(&mut self) {
        self.in_flight.oldest_answered().await
    }

    /// Sends the ack or error of the oldest publish in flight, once the broker answered it.
    async fn settle_oldest(&mut self) {
        if let Some(answered) = self.in_flight.next_answer().await {
            let frame = self.reply_to(answered);
            self.reply(frame).await;
        }
    }

    /// The ack or error of the oldest publish in flight, taken off the window, if the
    /// broker answered it.
    pub(super) fn oldest_reply(&mut self) -> Option<String> {
        let answered = self.in_flight.answered()?;
        Some(self.reply_to(answered))
    }

    /// The ack or error for a publish the broker answered.
    fn reply_to(&self, answered: Answered) -> String {
        let Answered {
            message_id,
            started,
            result,
        } = answered;
        match result {
            Ok(at) => {
                self.metrics.published(started.elapsed());
                Answer::published(at).frame(&message_id)
            }
            Err(e) => {
                let refusal = Refusal::Broker(e);
                error_frame(Some(&message_id), refusal.code(), &refusal.message())
            }
        }
    }

    /// Sends the replies of every publish in flight, so that what follows comes after.
    async fn settle_all(&mut self) {
        while !self.in_flight.is_empty() {
            self.settle_oldest().await;
        }
    }

    /// Calls the `disconnect` hook, once per socket.
    pub(super) async fn fire_disconnect(&mut self, reason: DisconnectReason) {
        if self.disconnect_fired {
            return;
        }
        self.disconnect_fired = true;
        let mut info = self.me.info();
        if let Some(before) = self.connecting_from.take() {
            (info.connection_id, info.bound, info.granted) = *before;
        }
        if let Some(notifier) = &self.node.notifier {
            notifier.notify(Happened::Disconnect {
                socket: Box::new(info.clone()),
                reason,
            });
        }
        let done = ask(self.hooks.get(|h| &mut h.disconnect), || DisconnectEvent {
            socket: info,
            reason,
        });
        if let Some(Err(e)) = done.await {
            tracing::warn!(error = %e, "disconnect hook failed");
        }
    }

    /// Joins `room` on this node; returns whether the socket was not a member before. On
    /// `Ok`, every frame published to the room from now on reaches this socket.
    ///
    /// Cancel-safe: once the broker was asked, the room is in `self.rooms`, so the socket's
    /// cleanup gives the acquisition back even if this future is dropped mid-way.
    async fn join(&mut self, room: &str) -> Result<bool, Refusal> {
        let member: SharedMember = self.queue.clone();
        self.join_as(room, member).await
    }

    /// [`Socket::join`] through `member` (the socket's queue, or a wrapper of it).
    async fn join_as(&mut self, room: &str, member: SharedMember) -> Result<bool, Refusal> {
        if self.rooms.contains(room) {
            return Ok(false);
        }
        let max = self.node.config.max_rooms_per_socket;
        if self.rooms.len() >= max {
            return Err(Refusal::TooManyRooms(max));
        }
        // Become a local member first, so that nothing published after the broker
        // confirms the subscription can slip past this socket.
        let key = self.node.rooms.join(room, self.me.id, &member);
        let acquired = self.node.broker.acquire(&key);
        self.rooms.insert(key.clone());
        let joined = match acquired.wait().await {
            Ok(()) => self.enter_presence(&key).await,
            Err(e) => Err(Refusal::Broker(e)),
        };
        match joined {
            Ok(()) => Ok(true),
            Err(refusal) => {
                self.leave(&key);
                Err(refusal)
            }
        }
    }

    fn leave(&mut self, room: &str) {
        if let Some(key) = self.rooms.take(room) {
            self.exit_presence(&key);
            self.node.rooms.leave(&key, self.me.id);
            self.node.broker.release(&key);
        }
    }

    /// Lets go of the bound identity (its record's time to live runs once no socket holds
    /// it); called once, when the socket ends.
    pub(super) fn release_identity(&mut self) {
        if std::mem::take(&mut self.holds_identity) {
            self.node.broker.unhold(&self.me.identity);
        }
    }

    /// Leaves every room on this node (the identity keeps its recorded rooms).
    pub(super) fn leave_all(&mut self) {
        for key in std::mem::take(&mut self.rooms) {
            self.exit_presence(&key);
            self.node.rooms.leave(&key, self.me.id);
            self.node.broker.release(&key);
        }
    }
}

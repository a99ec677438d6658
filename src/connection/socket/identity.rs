//! Binding a socket to an identity: `connect`, its hook, and the rejoin of the identity's
//! recorded rooms, all or nothing.

use std::borrow::Cow;
use std::sync::Arc;

use futures_util::{stream, StreamExt};

use super::answer::{Answer, Rejoined};
use super::{subscribe_verdict, Refusal, Socket};
use crate::hooks::{
    ask, ConnectEvent, ConnectVerdict, Grant, RefreshEvent, RefreshVerdict, SubscribeEvent,
};
use crate::protocol::{ErrorCode, Since};

/// How many recorded rooms a `connect` asks the subscribe hook about at once.
const ASKED_AT_ONCE: usize = 8;

impl Socket {
    /// `connect`; with `since` (protocol 1.1), history rooms are recovered and the ack
    /// lists every rejoined room. The socket's identity, grant and deadline change only
    /// when it succeeds.
    pub(super) async fn connect(
        &mut self,
        claimed: &str,
        token: Option<&str>,
        since: Option<Vec<(Cow<'_, str>, Since<'_>)>>,
    ) -> Result<Answer, Refusal> {
        let verdict = ask(self.hooks.get(|h| &mut h.connect), || ConnectEvent {
            socket: self.me.info(),
            connection_id: claimed.to_owned(),
            token: token.map(str::to_owned),
        });
        let grant = match verdict.await {
            None | Some(Ok(ConnectVerdict::Accept)) => Grant::new(),
            Some(Ok(ConnectVerdict::Assign(id))) => Grant::new().identity(id),
            Some(Ok(ConnectVerdict::Grant(grant))) => grant,
            Some(Ok(ConnectVerdict::Refuse(reason))) => return Err(Refusal::Forbidden(reason)),
            Some(Err(e)) => return Err(Refusal::hook_failed("connect", e)),
        };
        let connection_id = grant.identity.as_deref().unwrap_or(claimed);
        if let Err(refusal) = self.check_identity(connection_id, grant.identity.is_some()) {
            if grant.identity.is_some() {
                // The hook's mistake, not the client's.
                let e = std::io::Error::other(refusal.message());
                return Err(Refusal::hook_failed("connect", e.into()));
            }
            return Err(refusal);
        }
        if self.me.bound && *self.me.identity != *connection_id {
            return Err(Refusal::OtherIdentity);
        }
        let max_room = self.node.config.limits.max_room_id_len;
        if let Some(room) = grant
            .rooms
            .iter()
            .find(|room| room.is_empty() || room.len() > max_room)
        {
            let e = format!("the connect hook granted a room that cannot be used: {room:?}");
            return Err(Refusal::hook_failed(
                "connect",
                std::io::Error::other(e).into(),
            ));
        }
        let rooms = self
            .node
            .broker
            .rooms_of(connection_id)
            .await
            .map_err(Refusal::BrokerRead)?;
        // Bound with the new grant for the rejoin (the subscribe hook sees the identity
        // and grant being connected), and put back as it was if it fails: a refused
        // connect changes nothing. What it was is kept where the disconnect hook finds it
        // if the socket ends meanwhile.
        let before = (
            std::mem::replace(&mut self.me.identity, connection_id.into()),
            std::mem::replace(&mut self.me.bound, true),
            std::mem::replace(&mut self.me.granted, Arc::new(grant.values)),
        );
        self.connecting_from = Some(Box::new(before));
        let rejoined = self.rejoin(rooms, grant.rooms, since.as_deref()).await;
        let before = self.connecting_from.take();
        match rejoined {
            Ok(rejoined) => {
                if !self.holds_identity {
                    tracing::Span::current().record("identity", &*self.me.identity);
                    self.node.broker.hold(&self.me.identity);
                    self.holds_identity = true;
                }
                self.expires_at = grant.expires_at;
                self.rebind_presence().await;
                Ok(match since {
                    Some(_) => Answer::Connected(rejoined),
                    None => Answer::Ack,
                })
            }
            Err(refusal) => {
                if let Some(before) = before {
                    (self.me.identity, self.me.bound, self.me.granted) = *before;
                }
                Err(refusal)
            }
        }
    }

    /// Whether a `connect` may bind `identity`: within the identity length limit, and not
    /// the identity the server's own publishes are sent as. `assigned`: a hook chose it.
    fn check_identity(&self, identity: &str, assigned: bool) -> Result<(), Refusal> {
        let config = &self.node.config;
        let max = config.limits.max_connection_id_len;
        let who = if assigned {
            "assigned identity"
        } else {
            "connectionID"
        };
        if identity.is_empty() {
            return Err(Refusal::BadIdentity(format!("the {who} is empty")));
        }
        if identity.len() > max {
            return Err(Refusal::BadIdentity(format!(
                "the {who} is longer than {max} bytes"
            )));
        }
        if identity == config.server_sender_id {
            return Err(Refusal::BadIdentity(format!(
                "the {who} {identity:?} is reserved for the server's own messages"
            )));
        }
        Ok(())
    }

    /// `refresh`: the hook checks the new token; on success the socket's grant and
    /// deadline become the new ones, and on refusal nothing changes.
    pub(super) async fn refresh(&mut self, token: &str) -> Result<Answer, Refusal> {
        if !self.me.bound && self.hooks.get(|h| &mut h.refresh).is_some() {
            return Err(Refusal::Forbidden("connect first".into()));
        }
        let verdict = ask(self.hooks.get(|h| &mut h.refresh), || RefreshEvent {
            socket: self.me.info(),
            token: token.to_owned(),
        });
        let grant = match verdict.await {
            None => {
                return Err(Refusal::NotEnabled(
                    "this server does not renew credentials",
                ))
            }
            Some(Ok(RefreshVerdict::Grant(grant))) => grant,
            Some(Ok(RefreshVerdict::Refuse(reason))) => return Err(Refusal::Forbidden(reason)),
            Some(Err(e)) => return Err(Refusal::hook_failed("refresh", e)),
        };
        if grant
            .identity
            .as_deref()
            .is_some_and(|id| *id != *self.me.identity)
        {
            return Err(Refusal::OtherIdentity);
        }
        self.me.granted = Arc::new(grant.values);
        self.expires_at = grant.expires_at;
        Ok(Answer::Ack)
    }

    /// Joins every room the connect hook granted and every recorded room the subscribe
    /// hook allows (asked about [`ASKED_AT_ONCE`] rooms at a time), or none: past the
    /// socket's room limit, or when one cannot be joined, whatever this call joined is left
    /// again. With `since` (a 1.1 client), history rooms say where they stand, and those
    /// listed in it are recovered.
    async fn rejoin(
        &mut self,
        recorded: Vec<String>,
        granted: Vec<String>,
        since: Option<&[(Cow<'_, str>, Since<'_>)]>,
    ) -> Result<Vec<(String, Rejoined)>, Refusal> {
        let max = self.node.config.max_rooms_per_socket;
        if granted.len() > max {
            return Err(Refusal::TooManyRooms(max));
        }
        let mut wanted: Vec<String> = Vec::with_capacity(recorded.len() + granted.len());
        for room in granted {
            if !self.rooms.contains(room.as_str()) && !wanted.contains(&room) {
                wanted.push(room);
            }
        }
        let recorded: Vec<String> = recorded
            .into_iter()
            .filter(|room| !self.rooms.contains(room.as_str()) && !wanted.contains(room))
            .collect();
        let hook = self.hooks.get(|h| &mut h.subscribe).cloned();
        let socket = self.me.info();
        // Asked a few at a time (a clone of the hook each), answers taken in order: with a
        // hook over HTTP, a rejoin of many rooms costs a few round trips to the backend, not
        // one per room. From the first `unavailable` on (a backend with fewer free slots
        // than were asked at once says so), the rest are asked one at a time, as a socket
        // asks about its frames: only if the hook cannot answer that way does the connect
        // fail.
        let mut answered = 0;
        let mut verdicts = stream::iter(recorded.iter().cloned())
            .map(|room| {
                let mut hook = hook.clone();
                let event = SubscribeEvent {
                    socket: socket.clone(),
                    room,
                };
                async move { subscribe_verdict(ask(hook.as_mut(), || event).await) }
            })
            .buffered(ASKED_AT_ONCE);
        while let Some(verdict) = verdicts.next().await {
            if matches!(&verdict, Err(refusal) if refusal.code() == ErrorCode::Unavailable) {
                break;
            }
            let room = &recorded[answered];
            if rejoins(room, verdict)? {
                wanted.push(room.clone());
            }
            answered += 1;
        }
        drop(verdicts);
        for room in &recorded[answered..] {
            let verdict = self.allowed_to_subscribe(room).await;
            if rejoins(room, verdict)? {
                wanted.push(room.clone());
            }
        }
        if self.rooms.len() + wanted.len() > max {
            return Err(Refusal::TooManyRooms(max));
        }
        let mut rejoined = Vec::with_capacity(wanted.len());
        let mut budget = self.catch_up_budget();
        for room in wanted {
            match self.rejoin_one(&room, since, &mut budget).await {
                Ok(how) => rejoined.push((room, how)),
                Err(refusal) => {
                    for (joined, _) in &rejoined {
                        self.leave(joined);
                    }
                    return Err(refusal);
                }
            }
        }
        Ok(rejoined)
    }

    async fn rejoin_one(
        &mut self,
        room: &str,
        since: Option<&[(Cow<'_, str>, Since<'_>)]>,
        budget: &mut usize,
    ) -> Result<Rejoined, Refusal> {
        let history = self.node.config.rooms.settings(room).history;
        let (Some(history), Some(since)) = (history, since) else {
            self.join(room).await?;
            return Ok(Rejoined::Plain);
        };
        if let Some((_, since)) = since.iter().find(|(r, _)| r == room) {
            return self
                .join_recovering(room, history, since, budget)
                .await
                .map(Rejoined::Recovered);
        }
        self.join(room).await?;
        match self.node.broker.top(room, history).await {
            Ok(top) => Ok(Rejoined::At(top)),
            Err(e) => {
                self.leave(room);
                Err(Refusal::BrokerRead(e))
            }
        }
    }
}

/// What the `subscribe` hook's verdict on a recorded room means for a `connect`: rejoined
/// (`true`), or skipped when refused (`false`; it stays recorded), or, when the hook could
/// not decide (its "try later" codes are not refusals), the connect fails and nothing is
/// joined.
fn rejoins(room: &str, verdict: Result<(), Refusal>) -> Result<bool, Refusal> {
    match verdict {
        Ok(()) => Ok(true),
        Err(refusal @ (Refusal::Forbidden(_) | Refusal::HookRefused(..)))
            if !matches!(
                refusal.code(),
                ErrorCode::Unavailable | ErrorCode::Timeout | ErrorCode::Internal
            ) =>
        {
            let reason = refusal.message();
            tracing::debug!(room, reason, "subscribe hook refused a recorded room");
            Ok(false)
        }
        Err(refusal) => Err(refusal),
    }
}

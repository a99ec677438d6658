//! History rooms on a socket: the `history` request, and `subscribe` with `since`, which
//! recovers what the socket missed (see `connection::recovery`).

use std::sync::Arc;

use super::answer::{Answer, Recovering};
use super::{Refusal, Socket};
use crate::broker::Page;
use crate::connection::recovery::HoldingMember;
use crate::protocol::Since;
use crate::rooms::SharedMember;
use crate::settings::History;

impl Socket {
    /// `subscribe` with `since` (protocol 1.1). In a room with history, the socket joins
    /// holding live frames, reads what the history keeps after `since`, and (after the ack)
    /// gets the missed messages, then the live ones: each message after `since` once, in
    /// offset order. `recovered: false` when the epoch differs or the history no longer
    /// reaches back to `since`; the socket then gets what follows the current top. In a
    /// room without history `since` is ignored; in one the socket is already in, it is
    /// refused (nothing changes): the socket has had every message since it joined, or a
    /// `gap`.
    pub(super) async fn subscribe_since(
        &mut self,
        room: &str,
        since: &Since<'_>,
    ) -> Result<Answer, Refusal> {
        let Some(history) = self.node.config.rooms.settings(room).history else {
            return self.subscribe(room).await.map(Answer::at);
        };
        if self.rooms.contains(room) {
            return Err(Refusal::AlreadyIn);
        }
        self.allowed_to_subscribe(room).await?;
        self.identity_has_room_for(room).await?;
        let mut budget = self.catch_up_budget();
        let recovering = self
            .join_recovering(room, history, since, &mut budget)
            .await?;
        if self.me.bound {
            let max = self.node.config.max_rooms_per_socket;
            let refusal = match self.node.broker.record(&self.me.identity, room, max).await {
                Ok(true) => return Ok(Answer::Recovered(recovering)),
                Ok(false) => Refusal::IdentityFull(max),
                Err(e) => Refusal::Broker(e),
            };
            self.leave(room);
            return Err(refusal);
        }
        Ok(Answer::Recovered(recovering))
    }

    /// How many bytes of missed messages one request (a `subscribe`, or a `connect` for all
    /// its rooms) may recover: the socket's byte bound. A room whose missed messages do not
    /// fit in what is left is not recovered (`recovered: false`: the client learns of the
    /// gap and can page back through `history`), so that a socket never makes the node hold
    /// more than its bound in catch-up.
    pub(super) fn catch_up_budget(&self) -> usize {
        self.queue.max_bytes()
    }

    /// Joins `room` holding its live frames, and reads what its history keeps after
    /// `since` (leaving the room again if that fails); what it recovers comes out of
    /// `budget`.
    pub(super) async fn join_recovering(
        &mut self,
        room: &str,
        history: History,
        since: &Since<'_>,
        budget: &mut usize,
    ) -> Result<Recovering, Refusal> {
        let member = Arc::new(HoldingMember::new(
            self.queue.clone(),
            room.into(),
            self.node.config.outbound_queue,
        ));
        let shared: SharedMember = member.clone();
        self.join_as(room, shared).await?;
        let read = (since.offset, &*since.epoch);
        let recovery = match self
            .node
            .broker
            .recover(room, history, read, Some(*budget))
            .await
        {
            Ok(recovery) => recovery,
            Err(e) => {
                self.leave(room);
                return Err(Refusal::BrokerRead(e));
            }
        };
        let recovered = recovery.recovers(since.offset, &since.epoch, history.size);
        if recovered {
            let bytes: usize = recovery.frames.iter().map(|frame| frame.len()).sum();
            *budget = budget.saturating_sub(bytes);
        }
        Ok(Recovering {
            at: recovery.top,
            recovered,
            missed: if recovered {
                recovery.frames
            } else {
                Vec::new()
            },
            member,
        })
    }

    /// The last messages of a room with history (the `subscribe` hook decides who may read
    /// them, as it decides who may receive them): the last `limit` before `before` (if
    /// given), cut to the newest that fit in [`Socket::reply_budget`] (at least one), and
    /// whether older ones were left out for it.
    pub(super) async fn history(
        &mut self,
        room: &str,
        limit: Option<u64>,
        before: Option<u64>,
    ) -> Result<Answer, Refusal> {
        let Some(history) = self.node.config.rooms.settings(room).history else {
            return Err(Refusal::NotEnabled("this room keeps no history"));
        };
        self.allowed_to_subscribe(room).await?;
        let limit = limit.map_or(history.size, |limit| {
            usize::try_from(limit)
                .unwrap_or(usize::MAX)
                .min(history.size)
        });
        let page = Page {
            limit,
            before,
            budget: Some(self.reply_budget()),
        };
        let (at, frames, more) = self
            .node
            .broker
            .history(room, history, page)
            .await
            .map_err(Refusal::BrokerRead)?;
        Ok(Answer::History(at, frames, more))
    }

    /// The most bytes of messages one `history` reply (or of members one `presence`
    /// reply) carries: a quarter of the socket's byte bound, so that a reply always fits
    /// beside what is queued.
    pub(super) fn reply_budget(&self) -> usize {
        self.queue.max_bytes() / 4
    }
}

//! Presence rooms on a socket: the socket counts in every presence room it is in, under
//! the identity it had when it joined (moved over when `connect` binds another), and the
//! `presence` request.

use std::sync::Arc;

use super::answer::Answer;
use super::{Refusal, Socket};
use crate::broker::Confirmation;
use crate::settings::Presence;

impl Socket {
    /// Counts this socket in `room`'s presence, if the room has it on; once this returns
    /// `Ok`, every node sees the socket's identity there. On `Err`, the caller leaves the
    /// room (which takes the socket out again).
    pub(super) async fn enter_presence(&mut self, room: &Arc<str>) -> Result<(), Refusal> {
        let presence = self.node.config.rooms.settings(room).presence;
        if !presence.is_on() || self.present.contains_key(room) {
            return Ok(());
        }
        let identity = self.me.identity.clone();
        // Queued now: from here on, leaving the room takes it out again, even if this
        // future is dropped before the broker answers.
        let entered = self.node.broker.presence_join(room, &identity, presence);
        self.present.insert(room.clone(), (identity, presence));
        entered.wait().await.map_err(Refusal::BrokerRead)
    }

    /// Takes this socket out of `room`'s presence, if it is counted there. The change is
    /// queued in order with the socket's others; dropping the returned confirmation does
    /// not undo it.
    pub(super) fn exit_presence(&mut self, room: &str) -> Option<Confirmation> {
        let (room, (identity, presence)) = self.present.remove_entry(room)?;
        Some(self.node.broker.presence_leave(&room, &identity, presence))
    }

    /// [`Socket::exit_presence`], waiting until the broker has taken the socket out (and
    /// published its `leave`, if it was the identity's last): an `unsubscribe` is acked
    /// only then, so that what the client does next comes after its leave everywhere.
    pub(super) async fn exit_presence_confirmed(&mut self, room: &str) {
        let Some(left) = self.exit_presence(room) else {
            return;
        };
        if let Err(e) = left.wait().await {
            // The node's next presence refresh writes it again.
            tracing::debug!(error = %e.report(), "presence leave not confirmed yet");
        }
    }

    /// After `connect` bound a new identity: the presence rooms the socket joined before
    /// count it under that identity instead.
    pub(super) async fn rebind_presence(&mut self) {
        let identity = self.me.identity.clone();
        let mut moved = Vec::new();
        for (room, (counted, presence)) in self.present.iter_mut() {
            if *counted == identity {
                continue;
            }
            let broker = &self.node.broker;
            drop(broker.presence_leave(room, counted, *presence));
            moved.push(broker.presence_join(room, &identity, *presence));
            *counted = identity.clone();
        }
        for entered in moved {
            // A failed write is sent again by the node's next presence refresh.
            if let Err(e) = entered.wait().await {
                tracing::debug!(error = %e.report(), "presence not moved to the bound identity yet");
            }
        }
    }

    /// `presence` (protocol 1.1): who is in a room, on every node. A socket may ask about
    /// a room it is in, or one the `subscribe` hook would let it join.
    pub(super) async fn presence(&mut self, room: &str) -> Result<Answer, Refusal> {
        let presence = self.node.config.rooms.settings(room).presence;
        if presence == Presence::Off {
            return Err(Refusal::NotEnabled("this room does not track presence"));
        }
        if !self.rooms.contains(room) {
            self.allowed_to_subscribe(room).await?;
        }
        let max = self.node.config.presence_members_max;
        let mut members = self
            .node
            .broker
            .presence(room, presence, max)
            .await
            .map_err(Refusal::BrokerRead)?;
        // Cut to a quarter of the socket's byte bound, as a `history` reply is: a list of
        // long identities must not close the socket that asks (`count` stays exact).
        let budget = self.reply_budget();
        let mut bytes = 0;
        let fit = members.listed.iter().position(|member| {
            bytes += member.len() + 1;
            bytes > budget
        });
        if let Some(fit) = fit {
            members.listed.truncate(fit);
        }
        Ok(Answer::Presence(members))
    }
}

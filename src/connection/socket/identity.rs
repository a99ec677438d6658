//! Binding a socket to an identity: `connect`, its hook, and the rejoin of the identity's
//! recorded rooms, all or nothing.

use super::{Refusal, Socket};
use crate::hooks::{ask, ConnectEvent, ConnectVerdict};

impl Socket {
    pub(super) async fn connect(
        &mut self,
        claimed: &str,
        token: Option<&str>,
    ) -> Result<(), Refusal> {
        let mut connection_id = claimed.to_owned();
        let verdict = ask(&mut self.hooks.connect, || ConnectEvent {
            socket: self.me.info(),
            connection_id: claimed.to_owned(),
            token: token.map(str::to_owned),
        });
        match verdict.await {
            None | Some(Ok(ConnectVerdict::Accept)) => {}
            Some(Ok(ConnectVerdict::Assign(id))) if id.is_empty() => {
                return Err(Refusal::hook_failed(
                    "connect",
                    "assigned an empty identity".into(),
                ))
            }
            Some(Ok(ConnectVerdict::Assign(id))) => connection_id = id,
            Some(Ok(ConnectVerdict::Refuse(reason))) => return Err(Refusal::Forbidden(reason)),
            Some(Err(e)) => return Err(Refusal::hook_failed("connect", e)),
        }
        if self.me.bound && *self.me.identity != *connection_id {
            return Err(Refusal::OtherIdentity);
        }
        let rooms = self
            .node
            .broker
            .rooms_of(&connection_id)
            .await
            .map_err(Refusal::BrokerRead)?;
        // Bound for the rejoin (the subscribe hook sees the identity being connected), and
        // unbound again if it fails: a refused connect changes nothing.
        let before = (self.me.identity.clone(), self.me.bound);
        self.me.identity = connection_id.into();
        self.me.bound = true;
        match self.rejoin(rooms).await {
            Ok(()) => {
                if !before.1 {
                    tracing::Span::current().record("identity", &*self.me.identity);
                    self.node.broker.hold(&self.me.identity);
                }
                Ok(())
            }
            Err(refusal) => {
                (self.me.identity, self.me.bound) = before;
                Err(refusal)
            }
        }
    }

    /// Joins every recorded room the subscribe hook allows, or none: past the socket's room
    /// limit, or when one cannot be joined, whatever this call joined is left again.
    async fn rejoin(&mut self, rooms: Vec<String>) -> Result<(), Refusal> {
        let mut wanted = Vec::with_capacity(rooms.len());
        for room in rooms {
            if self.rooms.contains(room.as_str()) {
                continue;
            }
            match self.allowed_to_subscribe(&room).await {
                Ok(()) => wanted.push(room),
                Err(Refusal::Forbidden(reason)) => {
                    tracing::debug!(room, reason, "subscribe hook refused a recorded room");
                }
                Err(refusal) => return Err(refusal),
            }
        }
        let max = self.node.config.max_rooms_per_socket;
        if self.rooms.len() + wanted.len() > max {
            return Err(Refusal::TooManyRooms(max));
        }
        for (n, room) in wanted.iter().enumerate() {
            if let Err(refusal) = self.join(room).await {
                for joined in &wanted[..n] {
                    self.leave(joined);
                }
                return Err(refusal);
            }
        }
        Ok(())
    }
}

//! The task that owns this node's presence counts and sends them to Redis, in order.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use redis::Value;
use tokio::sync::mpsc;

use super::{pipeline, Change, Request, Shared, BATCH};
use crate::broker::presence::Counts;
use crate::broker::redis::connect::refused;
use crate::error::BrokerError;
use crate::settings::Presence;

/// The task that owns this node's presence counts.
pub(super) struct Task {
    pub(super) shared: Arc<Shared>,
    pub(super) counts: Counts,
    /// The presence setting of each room this node has (or had, while it is dirty).
    pub(super) settings: HashMap<Arc<str>, Presence>,
    /// Rooms whose share on Redis may differ from `counts`: sent whole at the next refresh.
    pub(super) dirty: HashSet<Arc<str>>,
}

impl Task {
    pub(super) async fn run(mut self, mut changes: mpsc::UnboundedReceiver<Request>) {
        let every = (self.shared.ttl / 6).max(Duration::from_millis(10));
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            tokio::select! {
                received = changes.recv_many(&mut batch, BATCH) => {
                    if received == 0 {
                        return;
                    }
                    self.apply(&mut batch).await;
                }
                _ = tick.tick() => self.refresh().await,
            }
        }
    }

    /// Applies `batch` to the counts and sends the new counts to Redis, in one pipeline;
    /// then answers the flushes in it.
    async fn apply(&mut self, requests: &mut Vec<Request>) {
        let mut flushes = Vec::new();
        let mut batch = Vec::with_capacity(requests.len());
        for request in requests.drain(..) {
            match request {
                Request::Change(change) => batch.push(change),
                Request::Flush(done) => flushes.push(done),
            }
        }
        if !batch.is_empty() {
            self.send_changes(batch).await;
        }
        for done in flushes {
            let _ = done.send(Ok(()));
        }
    }

    async fn send_changes(&mut self, mut batch: Vec<Change>) {
        let mut pipeline = pipeline();
        for change in batch.iter() {
            let sockets = match change.joined {
                true => self.counts.add(&change.room, &change.identity),
                false => self
                    .counts
                    .remove(&change.room, &change.identity)
                    .unwrap_or(0),
            };
            self.settings.insert(change.room.clone(), change.presence);
            self.shared
                .call(&mut pipeline, "set", &change.room, change.presence)
                .arg(&*change.identity)
                .arg(sockets);
        }
        let replies = self.shared.send(&pipeline).await;
        for (n, change) in batch.drain(..).enumerate() {
            let result = match &replies {
                Ok(replies) => match replies.get(n) {
                    Some(Value::ServerError(e)) => Err(refused(e.clone())),
                    reply => match reply.and_then(|r| self.shared.status(&change.room, r)) {
                        Some(1) => Ok(()),
                        // This node had been swept out as dead: its share goes whole again.
                        Some(0) => {
                            self.dirty.insert(change.room.clone());
                            Ok(())
                        }
                        _ => Err(BrokerError::Protocol(format!(
                            "{reply:?} from the presence script"
                        ))),
                    },
                },
                Err(e) => Err(e.clone()),
            };
            if result.is_err() {
                self.dirty.insert(change.room.clone());
            }
            let _ = change.done.send(result);
        }
        self.forget_settled();
    }

    /// Forgets the settings of rooms this node left, once Redis agrees.
    fn forget_settled(&mut self) {
        let (counts, dirty) = (&self.counts, &self.dirty);
        self.settings
            .retain(|room, _| counts.room(room).is_some() || dirty.contains(room));
    }

    /// Renews this node's share in every room it has, and sweeps out dead nodes. Rooms
    /// that may differ from Redis (or that Redis lost) are sent whole.
    async fn refresh(&mut self) {
        let rooms: Vec<Arc<str>> = self.settings.keys().cloned().collect();
        let mut whole = Vec::new();
        for chunk in rooms.chunks(BATCH) {
            let mut pipeline = pipeline();
            for room in chunk {
                let presence = self.settings[room];
                let identities = self.counts.room(room).map_or(0, HashMap::len);
                match self.dirty.contains(room) {
                    true => whole.push(room.clone()),
                    false => {
                        self.shared
                            .call(&mut pipeline, "touch", room, presence)
                            .arg(identities);
                    }
                }
            }
            let touched: Vec<&Arc<str>> =
                chunk.iter().filter(|r| !self.dirty.contains(*r)).collect();
            if touched.is_empty() {
                continue;
            }
            match self.shared.send(&pipeline).await {
                Ok(replies) => {
                    for (room, reply) in touched.into_iter().zip(replies) {
                        if self.shared.status(room, &reply) != Some(1) {
                            whole.push(room.clone());
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e.report(), "could not refresh presence");
                    return;
                }
            }
        }
        for chunk in whole.chunks(BATCH) {
            let mut pipeline = pipeline();
            for room in chunk {
                let command = self
                    .shared
                    .call(&mut pipeline, "sync", room, self.settings[room]);
                for (identity, sockets) in self.counts.room(room).into_iter().flatten() {
                    command.arg(&**identity).arg(*sockets);
                }
            }
            match self.shared.send(&pipeline).await {
                Ok(replies) => {
                    for (room, reply) in chunk.iter().zip(replies) {
                        if self.shared.status(room, &reply) == Some(1) {
                            self.dirty.remove(room);
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e.report(), "could not send presence again");
                    return;
                }
            }
        }
        self.forget_settled();
    }
}

//! The subscriber task's commands: acquire and release a room, ping every connection.

use std::sync::Arc;

use super::forward::Held;
use super::handle::Command;
use super::room_counts::Acquired;
use super::topology::moved;
use super::{is_subscribed, still_connected, Task};
use crate::error::BrokerError;

impl Task {
    pub(super) async fn handle(&mut self, command: Command) {
        match command {
            Command::Acquire { room, reply } => {
                let result = self.acquire(&room).await;
                let _ = reply.send(result);
            }
            Command::Release { room } => self.release(&room).await,
            Command::Ping { reply } => {
                let result = self.ping().await;
                let _ = reply.send(result);
            }
        }
    }

    /// Counts one acquisition of `room` and subscribes it if it is not. On failure the
    /// room stays counted until its caller releases it (see `room_counts`).
    async fn acquire(&mut self, room: &Arc<str>) -> Result<(), BrokerError> {
        let first = self.book.counts.get(room).is_none();
        if self.book.counts.acquire(room) == Acquired::Subscribed {
            return Ok(());
        }
        if first {
            self.book.tracks.opened(room);
        }
        let known = self.book.counts.was_subscribed(room);
        let mut result = self.subscribe_one(room).await;
        if result.as_ref().is_err_and(moved) {
            // The slot map known is out of date: read it, and try where it says now.
            if let Ok(true) = self.topology.refresh(self.timeout).await {
                self.follow_map().await;
            }
            // The new owner may be a master just added: wait for its connection.
            if let Some(index) = self.shard_of(room) {
                self.finish_connecting(index).await;
            }
            result = self.subscribe_one(room).await;
        }
        crate::metrics::redis_subscriptions(self.book.counts.subscribed_count());
        if known && result.is_ok() {
            // A room held without a subscription: its members missed what was published
            // meanwhile.
            self.book.catch_up(std::slice::from_ref(room)).await;
        }
        result
    }

    /// The index of the shard that serves `room`, if there is one.
    fn shard_of(&self, room: &str) -> Option<usize> {
        let owner = self.topology.owner(&self.book.keys, room)?;
        self.shards.iter().position(|shard| shard.key == owner)
    }

    /// Subscribes `room` on the shard that serves it.
    async fn subscribe_one(&mut self, room: &Arc<str>) -> Result<(), BrokerError> {
        let index = self.shard_of(room);
        if let Some(index) = index {
            if !self.shards[index].connected_before {
                // Its first connection, being made: wait for it (a node just started).
                // After a loss, fail at once, as while it is down.
                self.finish_connecting(index).await;
            }
        }
        let index = index.filter(|&index| self.shards[index].connection.is_some());
        let Some(index) = index else {
            self.book.subscribed(room, false);
            return Err(BrokerError::SubscriberDown);
        };
        let subscribe = self
            .topology
            .subscribe()
            .arg(self.book.keys.room_channel(room))
            .clone();
        let shard = &mut self.shards[index];
        let result = shard
            .command(
                &subscribe,
                &is_subscribed,
                1,
                self.book.forward(),
                Held::Nothing,
                self.timeout,
            )
            .await;
        self.book.subscribed(room, result.is_ok());
        if result.is_ok() {
            self.shards[index].rooms.insert(room.clone());
        }
        if let Err(e) = still_connected(result.clone()) {
            self.lost(index, e);
        }
        result
    }

    /// Gives one acquisition of `room` back; the last one unsubscribes it.
    async fn release(&mut self, room: &str) {
        if !self.book.counts.release(room) {
            return;
        }
        self.book.tracks.closed(room);
        let index = self
            .shards
            .iter_mut()
            .position(|shard| shard.rooms.remove(room));
        if let Some(index) = index {
            if let Err(e) = self.unsubscribe(index, room).await {
                self.lost(index, e);
            }
        }
        crate::metrics::redis_subscriptions(self.book.counts.subscribed_count());
    }

    /// Pings Redis on every pub/sub connection; all must answer. One that does not is
    /// lost (and connected again).
    pub(super) async fn ping(&mut self) -> Result<(), BrokerError> {
        let mut result = match self.shards.is_empty() {
            true => Err(BrokerError::SubscriberDown),
            false => Ok(()),
        };
        for index in 0..self.shards.len() {
            if !self.shards[index].connected_before {
                // Its first connection, being made: wait for it (a node just started).
                self.finish_connecting(index).await;
            }
            if self.shards[index].connection.is_none() {
                result = result.and(Err(BrokerError::SubscriberDown));
                continue;
            }
            let shard = &mut self.shards[index];
            let pinged = shard
                .command(
                    &redis::cmd("PING"),
                    &|reply| matches!(reply, super::Reply::Pong),
                    1,
                    self.book.forward(),
                    Held::Nothing,
                    self.timeout,
                )
                .await;
            if let Err(e) = still_connected(pinged.clone()) {
                self.lost(index, e);
            }
            result = result.and(pinged);
        }
        result
    }
}

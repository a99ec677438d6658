//! The subscriber task's commands: acquire and release a room, ping every connection.

use std::sync::Arc;

use super::forward::Held;
use super::handle::Command;
use super::room_counts::Acquired;
use super::{is_subscribed, moved, still_connected, Task};
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

    /// Subscribes `room` on the shard that serves it.
    async fn subscribe_one(&mut self, room: &Arc<str>) -> Result<(), BrokerError> {
        let index = self.shard_of(room);
        if let Some(index) = index {
            self.first_connection(index).await;
        }
        let index = index.filter(|&index| self.shards[index].connection.is_some());
        let Some(index) = index else {
            self.book.counts.subscribed(room, false);
            return Err(BrokerError::SubscriberDown);
        };
        let subscribe = self
            .topology
            .subscribe()
            .arg(self.book.keys.room_channel(room))
            .clone();
        let result = self
            .on_shard(index, &subscribe, &is_subscribed, 1, Held::Nothing)
            .await;
        match result {
            Ok(()) => self.subscribed_on(index, room),
            Err(_) => self.book.counts.subscribed(room, false),
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
            self.first_connection(index).await;
            if self.shards[index].connection.is_none() {
                result = result.and(Err(BrokerError::SubscriberDown));
                continue;
            }
            let is_pong = |reply: &super::Reply| matches!(reply, super::Reply::Pong);
            let pinged = self
                .on_shard(index, &redis::cmd("PING"), &is_pong, 1, Held::Nothing)
                .await;
            if let Err(e) = still_connected(pinged.clone()) {
                self.lost(index, e);
            }
            result = result.and(pinged);
        }
        result
    }
}

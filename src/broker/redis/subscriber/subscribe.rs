//! Subscribing rooms on a shard: in the groups one command takes, each group caught up as
//! soon as Redis confirms it; and unsubscribing one.

use std::sync::Arc;

use tokio::time::Instant;

use super::forward::Held;
use super::{denied, is_subscribed, moved, still_connected, Task, CHECK_EVERY};
use crate::broker::redis::resp::Reply;
use crate::error::BrokerError;

impl Task {
    /// Subscribes `rooms`, rooms without a subscription that shard `index` serves (see
    /// [`Task::subscribe_rooms`]). Returns how many rooms it tried.
    pub(super) async fn subscribe_failed(
        &mut self,
        index: usize,
        rooms: Vec<Arc<str>>,
        one_by_one: usize,
        reconnection: bool,
    ) -> Result<usize, BrokerError> {
        if rooms.is_empty() {
            return Ok(0);
        }
        let (refused, plain) = self
            .subscribe_rooms(index, &rooms, one_by_one, reconnection)
            .await?;
        if reconnection && plain > 0 {
            tracing::warn!(rooms = plain, "messages published while the pub/sub connection was down are lost in rooms without history: their members got a gap");
        }
        if refused > 0 && reconnection {
            tracing::warn!(rooms = refused, retry_every = ?CHECK_EVERY, "Redis refused to subscribe to rooms this node holds (an ACL?): their members receive nothing until a retry succeeds");
        } else if refused > 0 {
            tracing::debug!(rooms = refused, "rooms still refused");
        }
        crate::metrics::redis_subscriptions(self.book.counts.subscribed_count());
        Ok(rooms.len())
    }

    /// Subscribes `rooms` on shard `index`, in the groups one command takes, and catches
    /// each group up as soon as Redis confirmed it, before any later message of its rooms
    /// is read (their history frames that arrive while the group is being confirmed are
    /// held for it): what was published while a room that had been subscribed was not
    /// comes from the history, or its members get a `gap`. With `refused_too`, rooms Redis
    /// refuses are caught up as well (their members learn at once that they miss
    /// messages). Redis refuses a whole command for one channel its ACL denies: such a
    /// group's rooms are then tried one at a time (at most `one_by_one`; the rest stay
    /// failed). Returns how many rooms are left without a subscription, and how many rooms
    /// without history got a gap. An error means the connection is lost.
    async fn subscribe_rooms(
        &mut self,
        index: usize,
        rooms: &[Arc<str>],
        mut one_by_one: usize,
        refused_too: bool,
    ) -> Result<(usize, usize), BrokerError> {
        let (mut refused, mut plain) = (0, 0);
        let mut tries = self.topology.groups(&self.book.keys, rooms);
        tries.reverse();
        while let Some(group) = tries.pop() {
            let mut subscribe = self.topology.subscribe();
            for room in &group {
                subscribe.arg(self.book.keys.room_channel(room));
            }
            let held_rooms = group.iter().cloned().collect();
            let held = Held::Rooms(&held_rooms);
            let result = self
                .on_shard(index, &subscribe, &is_subscribed, group.len(), held)
                .await;
            // Rooms that had a subscription before: their members may have missed messages.
            let known: Vec<Arc<str>> = group
                .iter()
                .filter(|room| self.book.counts.was_subscribed(room))
                .cloned()
                .collect();
            match result {
                Ok(()) => {
                    for room in &group {
                        self.subscribed_on(index, room);
                    }
                    plain += self.book.catch_up(&known).await;
                    continue;
                }
                Err(e) if group.len() > 1 && denied(&e) => {
                    // Next, one at a time and in order (at most `one_by_one`).
                    let take = one_by_one.min(group.len());
                    one_by_one -= take;
                    for room in &group[take..] {
                        self.book.counts.subscribed(room, false);
                        refused += 1;
                    }
                    if refused_too {
                        let untried: Vec<Arc<str>> = known
                            .into_iter()
                            .filter(|room| !group[..take].contains(room))
                            .collect();
                        plain += self.book.catch_up(&untried).await;
                    }
                    tries.extend(group[..take].iter().rev().map(|room| vec![room.clone()]));
                    continue;
                }
                Err(e @ BrokerError::Refused(_)) => {
                    if moved(&e) {
                        // The slot map is out of date: read it at once.
                        self.next_check = Instant::now();
                    }
                    for room in &group {
                        self.book.counts.subscribed(room, false);
                    }
                    refused += group.len();
                }
                Err(e) => return Err(e),
            }
            if refused_too {
                plain += self.book.catch_up(&known).await;
            }
        }
        Ok((refused, plain))
    }

    /// Unsubscribes `room` on shard `index`, if it is connected. An error means the
    /// connection is lost.
    pub(super) async fn unsubscribe(
        &mut self,
        index: usize,
        room: &str,
    ) -> Result<(), BrokerError> {
        if self.shards[index].connection.is_none() {
            return Ok(());
        }
        let channel = self.book.keys.room_channel(room);
        let unsubscribe = self.topology.unsubscribe().arg(&channel).clone();
        // Its own confirmation: a master dropping another channel meanwhile says so too.
        let confirmed =
            |reply: &Reply| matches!(reply, Reply::Unsubscribed(c) if *c == channel.as_bytes());
        let result = self
            .on_shard(index, &unsubscribe, &confirmed, 1, Held::Nothing)
            .await;
        still_connected(result)
    }
}

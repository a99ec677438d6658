//! [`Answer`]: what a command's `ack` carries, and what follows it (the missed messages of
//! a recovered history room).

use std::sync::Arc;

use hyper_tungstenite::tungstenite::Utf8Bytes;
use serde_json::value::RawValue;

use crate::broker::presence::Members;
use crate::broker::{Accepted, Position};
use crate::connection::outbound::OutboundQueue;
use crate::connection::recovery::HoldingMember;
use crate::protocol::server::{self, RoomAck};

/// What an `ack` carries.
pub(super) enum Answer {
    Ack,
    /// Where the room's history stands (a message to, or a subscribe of, a history room).
    At(Position),
    /// A `message` whose idempotency key was recorded: published before (where, in a
    /// history room), not again.
    Duplicate(Option<Position>),
    /// The reply to `history`: where the room stands, the messages, and whether older ones
    /// were left out to keep the reply within its byte budget.
    History(Position, Vec<Utf8Bytes>, bool),
    /// The reply to a `subscribe` with `since`, and what follows the ack.
    Recovered(Recovering),
    /// The reply to a `connect` with `since`: each rejoined room.
    Connected(Vec<(String, Rejoined)>),
    /// The reply to `presence`.
    Presence(Members),
}

/// A history room being recovered for a socket.
pub(super) struct Recovering {
    pub(super) at: Position,
    pub(super) recovered: bool,
    /// The missed frames, sent right after the ack.
    pub(super) missed: Vec<Utf8Bytes>,
    /// Holds the live frames until the missed ones are queued.
    pub(super) member: Arc<HoldingMember>,
}

impl Recovering {
    /// Queues the missed frames, then the held live ones.
    async fn follow_up(self, queue: &OutboundQueue) {
        for frame in &self.missed {
            // A clone shares the frame's bytes.
            if queue.push_draining(frame.clone()).await.is_err() {
                // The socket is ending.
                return;
            }
        }
        self.member.release(&self.at, &self.missed);
    }
}

/// How a `connect` with `since` rejoined one room.
pub(super) enum Rejoined {
    Plain,
    At(Position),
    Recovered(Recovering),
}

impl Answer {
    pub(super) fn at(position: Option<Position>) -> Self {
        position.map_or(Answer::Ack, Answer::At)
    }

    /// The answer to a publish the broker accepted.
    pub(super) fn published(accepted: Accepted) -> Self {
        match accepted.duplicate {
            true => Answer::Duplicate(accepted.position),
            false => Answer::at(accepted.position),
        }
    }

    pub(super) fn frame(&self, message_id: &RawValue) -> String {
        match self {
            Answer::Ack => server::ack(message_id),
            Answer::At(at) => server::ack_at(message_id, at.offset, &at.epoch),
            Answer::Duplicate(at) => {
                server::ack_duplicate(message_id, at.as_ref().map(|at| (at.offset, &*at.epoch)))
            }
            Answer::History(at, frames, more) => {
                let frames: Vec<&str> = frames.iter().map(|f| f.as_str()).collect();
                server::history_ack(message_id, at.offset, &at.epoch, &frames, *more)
            }
            Answer::Presence(members) => server::presence_ack(
                message_id,
                members.count,
                members.listed.iter().map(String::as_str),
            ),
            Answer::Recovered(r) => {
                server::ack_recovered(message_id, r.at.offset, &r.at.epoch, r.recovered)
            }
            Answer::Connected(rooms) => {
                let acks: Vec<(&str, RoomAck<'_>)> = rooms
                    .iter()
                    .map(|(room, rejoined)| {
                        let ack = match rejoined {
                            Rejoined::Plain => RoomAck::Plain,
                            Rejoined::At(at) => RoomAck::History {
                                offset: at.offset,
                                epoch: &at.epoch,
                                recovered: None,
                            },
                            Rejoined::Recovered(r) => RoomAck::History {
                                offset: r.at.offset,
                                epoch: &r.at.epoch,
                                recovered: Some(r.recovered),
                            },
                        };
                        (room.as_str(), ack)
                    })
                    .collect();
                server::connect_ack(message_id, &acks)
            }
        }
    }

    /// What goes out after the ack: the missed messages, then the live ones held meanwhile
    /// (without those the missed ones already covered).
    pub(super) async fn follow_up(self, queue: &OutboundQueue) {
        match self {
            Answer::Recovered(r) => r.follow_up(queue).await,
            Answer::Connected(rooms) => {
                for (_, rejoined) in rooms {
                    if let Rejoined::Recovered(r) = rejoined {
                        r.follow_up(queue).await;
                    }
                }
            }
            _ => {}
        }
    }
}

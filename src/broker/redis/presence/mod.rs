//! Presence on Redis: who is in each room, on every node, and what happens when a node dies.
//!
//! # Layout
//! Per room, in its hash slot (see [`Keys`]):
//! - hash `presence:{ROOM}`: each member identity, with its sockets in the room on every
//!   node. `HLEN` is the member count; a `presence` read is one script call.
//! - hash `presence-node:{ROOM}:NODE`: this node's share of it;
//! - sorted set `presence-nodes:{ROOM}`: each node with members, scored by when its share
//!   expires (Redis's clock, so that nodes' clocks do not matter);
//! - string `presence-seq:{ROOM}`: the number of the room's last join or leave (the `seq`
//!   of their notifications), kept only by nodes with a notification hook.
//!
//! Every change goes through one script (`script.lua`) that first sweeps out the
//! shares of expired nodes, then applies the change to this node's share and to the member
//! hash together. An identity's join (its total going from 0) and leave (to 0) are decided
//! there, atomically, so that two nodes joining the same identity at once make exactly one
//! `join`, and the script publishes the event on the room's channel.
//!
//! # This node
//! One task owns this node's counts, so that changes reach Redis in the order sockets made
//! them (each carries an absolute count, so sending one again is harmless). Every sixth of
//! the presence TTL it renews its shares (`touch`: O(1) per room) and sweeps; a share that
//! Redis lost or that was swept while this node was stalled is sent whole again (`sync`).
//! Shares live five sixths of the TTL, so a dead node's members are gone, with `leave`
//! events, within the TTL: expiry, then the next sweep by a survivor's refresh or by any
//! `presence` read.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use redis::Value;
use tokio::sync::{mpsc, oneshot};

mod task;

use self::task::Task;
use super::commands::{pipeline, Commands};
use super::connect::{millis, refused};
use crate::broker::presence::{Counts, Members};
use crate::broker::{Confirmation, Keys};
use crate::error::BrokerError;
use crate::hooks::Happened;
use crate::notifier::Notifier;
use crate::protocol::server::{self, PresenceEvent};
use crate::settings::Presence;

/// The presence script (see the module docs).
const SCRIPT: &str = include_str!("script.lua");

/// Script calls sent in one pipeline, at most.
const BATCH: usize = 256;

/// What the task is asked.
enum Request {
    Change(Change),
    /// Answered once every change queued before it has been sent.
    Flush(oneshot::Sender<Result<(), BrokerError>>),
}

/// One socket joining or leaving a presence room.
struct Change {
    room: Arc<str>,
    identity: Arc<str>,
    joined: bool,
    presence: Presence,
    done: oneshot::Sender<Result<(), BrokerError>>,
}

/// What the task and the reads share.
struct Shared {
    commands: Commands,
    keys: Keys,
    timeout: Duration,
    /// This node's id in every room's presence: random per broker.
    node: Arc<str>,
    ttl: Duration,
    script: redis::Script,
    /// Told of every join and leave a script call of this node made.
    notifier: Option<Notifier>,
}

impl Shared {
    /// How long this node's shares live after each call.
    fn lifetime_ms(&self) -> u64 {
        millis(self.ttl * 5 / 6).max(50)
    }

    /// Appends a call of the script in `mode` for `room`; the caller adds the mode's
    /// arguments.
    fn call<'p>(
        &self,
        pipeline: &'p mut redis::Pipeline,
        mode: &str,
        room: &str,
        presence: Presence,
    ) -> &'p mut redis::Pipeline {
        let node_prefix = self.keys.presence_node_prefix(room);
        // The events' frames are built only for a room that announces them.
        let event = |event| match presence.announces() {
            true => server::presence_event_prefix(event, room),
            false => String::new(),
        };
        // Joins and leaves are numbered (a fourth key) only for a node that notifies them.
        let numbered = self.notifier.is_some();
        pipeline
            .cmd("EVALSHA")
            .arg(self.script.get_hash())
            .arg(if numbered { 4 } else { 3 })
            .arg(self.keys.presence_members(room))
            .arg(self.keys.presence_nodes(room))
            .arg(format!("{node_prefix}{}", self.node));
        if numbered {
            pipeline.arg(self.keys.presence_seq(room));
        }
        pipeline
            .arg(mode)
            .arg(&*self.node)
            .arg(self.lifetime_ms())
            .arg(match (presence.announces(), self.commands.is_cluster()) {
                (false, _) => "0",
                (true, false) => "PUBLISH",
                (true, true) => "SPUBLISH",
            })
            .arg(self.keys.room_channel(room))
            .arg(event(PresenceEvent::Join))
            .arg(event(PresenceEvent::Leave))
            .arg(node_prefix)
    }

    /// The status of a `set`, `touch` or `sync` call's reply (`None` for an error), after
    /// telling the notifier of the joins and leaves it made.
    fn status(&self, room: &Arc<str>, reply: &Value) -> Option<i64> {
        match reply {
            Value::Array(answer) => match answer.split_first() {
                Some((Value::Int(status), told)) => {
                    self.tell(room, told);
                    Some(*status)
                }
                _ => None,
            },
            _ => None,
        }
    }

    /// Notifies each join (`j`) and leave (`l`) in `told`: the kind, the event's number,
    /// `:` and the identity (a JSON string).
    fn tell(&self, room: &Arc<str>, told: &[Value]) {
        let Some(notifier) = &self.notifier else {
            return;
        };
        for event in told {
            let Value::BulkString(event) = event else {
                continue;
            };
            let Some((kind, rest)) = event.split_first() else {
                continue;
            };
            let Some(colon) = rest.iter().position(|&byte| byte == b':') else {
                continue;
            };
            let (seq, identity) = (&rest[..colon], &rest[colon + 1..]);
            let Some(seq) = std::str::from_utf8(seq)
                .ok()
                .and_then(|seq| seq.parse().ok())
            else {
                continue;
            };
            let Ok(identity) = serde_json::from_slice::<String>(identity) else {
                continue;
            };
            let (room, identity) = (room.clone(), Arc::from(identity));
            notifier.notify(match kind {
                b'j' => Happened::Join {
                    room,
                    identity,
                    seq,
                },
                _ => Happened::Leave {
                    room,
                    identity,
                    seq,
                },
            });
        }
    }

    /// Sends `pipeline` (the script loaded again if Redis lost it: every call carries
    /// absolute counts, so sending the calls again is harmless; a call that had run keeps
    /// its first reply, which holds the events it made).
    async fn send(&self, pipeline: &redis::Pipeline) -> Result<Vec<Value>, BrokerError> {
        let scripts = [&self.script];
        self.commands.send(self.timeout, pipeline, &scripts).await
    }
}

/// Presence rooms on Redis, for this node.
pub(crate) struct PresenceStore {
    shared: Arc<Shared>,
    changes: mpsc::UnboundedSender<Request>,
    /// The task's end of `changes`, until it starts.
    waiting: Mutex<Option<mpsc::UnboundedReceiver<Request>>>,
}

impl std::fmt::Debug for PresenceStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PresenceStore")
            .field("node", &self.shared.node)
            .finish_non_exhaustive()
    }
}

impl PresenceStore {
    pub(crate) fn new(
        commands: Commands,
        keys: Keys,
        timeout: Duration,
        ttl: Duration,
        notifier: Option<Notifier>,
    ) -> Self {
        let (changes, waiting) = mpsc::unbounded_channel();
        PresenceStore {
            shared: Arc::new(Shared {
                commands,
                keys,
                timeout,
                node: crate::broker::new_epoch(),
                ttl,
                script: redis::Script::new(SCRIPT),
                notifier,
            }),
            changes,
            waiting: Mutex::new(Some(waiting)),
        }
    }

    /// Starts the task (once; later calls do nothing). It ends when the store is dropped,
    /// after sending the changes still queued.
    pub(crate) fn start(&self) {
        let waiting = self
            .waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(changes) = waiting {
            let task = Task {
                shared: self.shared.clone(),
                counts: Counts::default(),
                settings: HashMap::new(),
                dirty: HashSet::new(),
            };
            tokio::spawn(task.run(changes));
        }
    }

    /// One more socket of `identity` in `room`; confirmed once Redis has it (and announced
    /// the join, if it was the identity's first socket there).
    pub(crate) fn join(&self, room: &Arc<str>, identity: &str, presence: Presence) -> Confirmation {
        self.change(room, identity, true, presence)
    }

    /// One socket of `identity` fewer in `room`.
    pub(crate) fn leave(
        &self,
        room: &Arc<str>,
        identity: &str,
        presence: Presence,
    ) -> Confirmation {
        self.change(room, identity, false, presence)
    }

    fn change(
        &self,
        room: &Arc<str>,
        identity: &str,
        joined: bool,
        presence: Presence,
    ) -> Confirmation {
        let (done, answer) = oneshot::channel();
        let change = Change {
            room: room.clone(),
            identity: server::presence_member(identity).into(),
            joined,
            presence,
            done,
        };
        match self.changes.send(Request::Change(change)) {
            Ok(()) => Confirmation::Pending(answer, "presence task"),
            Err(_) => Confirmation::Done(Err(BrokerError::Stopped("presence task"))),
        }
    }

    /// Confirmed once every change queued so far has reached Redis (or failed): a node
    /// shutting down waits for it, so that its members leave at once.
    pub(crate) fn flush(&self) -> Confirmation {
        let (done, answer) = oneshot::channel();
        match self.changes.send(Request::Flush(done)) {
            Ok(()) => Confirmation::Pending(answer, "presence task"),
            Err(_) => Confirmation::Done(Err(BrokerError::Stopped("presence task"))),
        }
    }

    /// Who is in `room` on every node (after sweeping out dead nodes), listing at most `max`.
    pub(crate) async fn members(
        &self,
        room: &str,
        presence: Presence,
        max: usize,
    ) -> Result<Members, BrokerError> {
        let shared = &self.shared;
        let mut pipeline = pipeline();
        shared.call(&mut pipeline, "read", room, presence).arg(max);
        let reply = shared.send(&pipeline).await?;
        let unexpected = |reply: &dyn std::fmt::Debug| {
            BrokerError::Protocol(format!("{reply:?} from the presence script"))
        };
        match reply.as_slice() {
            [Value::Array(answer)] => match answer.as_slice() {
                [Value::Int(count), Value::Array(listed), Value::Array(told)] => {
                    shared.tell(&Arc::from(room), told);
                    Ok(Members {
                        count: u64::try_from(*count).map_err(|_| unexpected(count))?,
                        listed: listed
                            .iter()
                            .map(|member| match member {
                                Value::BulkString(bytes) => {
                                    String::from_utf8(bytes.clone()).map_err(|_| unexpected(member))
                                }
                                other => Err(unexpected(other)),
                            })
                            .collect::<Result<_, _>>()?,
                    })
                }
                other => Err(unexpected(&other)),
            },
            [Value::ServerError(e)] => Err(refused(e.clone())),
            other => Err(unexpected(&other)),
        }
    }
}

//! The handle to the subscriber task: the commands it takes, and the `live` flag it keeps
//! (up while every pub/sub connection it needs is).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use super::super::connect::within;
use crate::broker::Confirmation;
use crate::error::BrokerError;

/// Commands for a subscriber task.
///
/// The channel is unbounded on purpose: a `Release` is sent from cleanup paths that cannot
/// wait, and every queued command stands for one membership or one waiting caller, so the
/// queue is bounded by the node's sockets and rooms.
pub(super) enum Command {
    Acquire {
        room: Arc<str>,
        reply: oneshot::Sender<Result<(), BrokerError>>,
    },
    Release {
        room: Arc<str>,
    },
    Ping {
        reply: oneshot::Sender<Result<(), BrokerError>>,
    },
}

/// The task's ends: the commands it takes, and where it says whether it is connected.
pub(super) struct TaskEnds {
    pub(super) commands: mpsc::UnboundedReceiver<Command>,
    pub(super) live: watch::Sender<bool>,
}

/// The handle to a running subscriber task; the task ends when the handle is dropped.
#[derive(Debug)]
pub(crate) struct Subscriptions {
    commands: mpsc::UnboundedSender<Command>,
    live: watch::Receiver<bool>,
    /// The task's name, for errors once it is gone.
    task: &'static str,
}

impl Subscriptions {
    /// A handle and the ends its task (named `task`) serves.
    pub(super) fn new(task: &'static str) -> (Self, TaskEnds) {
        let (commands, receiver) = mpsc::unbounded_channel();
        let (live_tx, live) = watch::channel(false);
        let ends = TaskEnds {
            commands: receiver,
            live: live_tx,
        };
        (
            Subscriptions {
                commands,
                live,
                task,
            },
            ends,
        )
    }

    /// See [`Broker::acquire`](crate::broker::Broker::acquire).
    pub(crate) fn acquire(&self, room: Arc<str>) -> Confirmation {
        let (reply, answer) = oneshot::channel();
        match self.commands.send(Command::Acquire { room, reply }) {
            Ok(()) => Confirmation::Pending(answer, self.task),
            Err(_) => Confirmation::Done(Err(BrokerError::Stopped(self.task))),
        }
    }

    /// See [`Broker::release`](crate::broker::Broker::release).
    pub(crate) fn release(&self, room: Arc<str>) {
        // Fails only when the task is gone, and then there is nothing left to release.
        let _ = self.commands.send(Command::Release { room });
    }

    /// Pings Redis on the subscriptions' connection(s), within `timeout`.
    pub(crate) async fn ping(&self, timeout: Duration) -> Result<(), BrokerError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Ping { reply })
            .map_err(|_| BrokerError::Stopped(self.task))?;
        within(timeout, async {
            answer.await.unwrap_or(Err(BrokerError::Stopped(self.task)))
        })
        .await
    }

    /// Waits until the task is connected, at most `timeout`.
    pub(crate) async fn wait_live(&self, timeout: Duration) -> Result<(), BrokerError> {
        let mut live = self.live.clone();
        let up = tokio::time::timeout(timeout, live.wait_for(|up| *up))
            .await
            .map(|changed| changed.is_ok());
        match up {
            Ok(true) => Ok(()),
            Ok(false) => Err(BrokerError::Stopped(self.task)),
            Err(_) => Err(BrokerError::Timeout(timeout)),
        }
    }
}

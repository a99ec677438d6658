//! The crate's error types: one per operation at the library boundary, each with its
//! sources, and [`BrokerError`], why Redis could not do what one of them asked.
//!
//! ```
//! # async fn run(hub: thinws::Hub) {
//! match hub.publish("lobby", &"hi").await {
//!     Ok(()) => {}
//!     Err(thinws::PublishError::Unavailable(e)) if e.outcome_unknown() => {
//!         // Sent, never answered: it may have been published.
//!     }
//!     Err(e) => eprintln!("not published: {}", e.report()),
//! }
//! # }
//! ```

use std::sync::Arc;
use std::time::Duration;

/// The underlying cause of an error, shared between the callers that waited for the same
/// Redis round trip.
pub type ErrorSource = Arc<dyn std::error::Error + Send + Sync>;

/// Why a layer or publisher could not be built on its Redis URL, or why
/// [`ThinWsBuilder::connect`](crate::ThinWsBuilder::connect) found Redis unusable.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The Redis URL could not be parsed, or its TLS settings cannot be used (the password,
    /// if any, is redacted).
    #[error("invalid Redis URL {url:?}")]
    InvalidRedisUrl {
        /// The URL, with any password replaced by `***`.
        url: String,
        /// What was wrong with it.
        #[source]
        source: ErrorSource,
    },
    /// Redis did not answer the connection check, or a connection pool could not be built.
    #[error("Redis unavailable")]
    Unavailable(#[from] BrokerError),
    /// Redis answered but is older than thinws needs (6.2: its scripts call `RPOP` with a
    /// count and `HRANDFIELD`).
    #[error("Redis {found} is too old: thinws needs Redis 6.2 or newer")]
    RedisTooOld {
        /// The version Redis reported.
        found: String,
    },
}

/// Why a publish ([`Hub::publish`](crate::Hub::publish),
/// [`Publisher::publish`](crate::Publisher::publish)) failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The payload could not be serialised to JSON; nothing was sent.
    #[error("payload is not serialisable to JSON")]
    InvalidPayload(#[source] Arc<serde_json::Error>),
    /// The idempotency key is empty or longer than
    /// [`MAX_KEY_LEN`](crate::protocol::MAX_KEY_LEN) bytes; nothing was sent.
    #[error("an idempotency key must be 1 to 64 bytes long")]
    InvalidKey,
    /// The publisher was built for one Redis but its URL names a node of a Redis Cluster,
    /// where rooms' channels are sharded; nothing was sent. Build it with
    /// [`Publisher::cluster_builder`](crate::Publisher::cluster_builder).
    #[error("this Redis is a node of a Redis Cluster: build the publisher with Publisher::cluster_builder")]
    ClusterNode,
    /// Redis could not take the message; [`BrokerError::outcome_unknown`] says whether it
    /// may have been published all the same.
    #[error("Redis unavailable")]
    Unavailable(#[from] BrokerError),
}

/// Why [`Hub::history`](crate::Hub::history) failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum HistoryError {
    /// Redis could not be read.
    #[error("Redis unavailable")]
    Unavailable(#[from] BrokerError),
}

/// Why [`Hub::presence`](crate::Hub::presence) failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum PresenceError {
    /// Redis could not be read.
    #[error("Redis unavailable")]
    Unavailable(#[from] BrokerError),
    /// A member kept in Redis is not the JSON string thinws writes (another writer, or a
    /// different key prefix's data).
    #[error("unreadable presence member {member:?}")]
    InvalidMember {
        /// The member as kept.
        member: String,
        /// Why it could not be read.
        #[source]
        source: Arc<serde_json::Error>,
    },
}

/// Why the broker (Redis) could not do an operation, or why a health probe failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// Redis gave no answer in time to a command that was sent: it may or may not have
    /// been carried out (see [`BrokerError::outcome_unknown`]).
    #[error("no answer from Redis within {0:?}; the outcome is unknown")]
    Timeout(Duration),
    /// The command waited its whole time for a connection and was never sent.
    #[error("Redis could not be reached within {0:?}; nothing was sent")]
    NotSent(Duration),
    /// A connection to Redis could not be opened, or was known to be closed; nothing was
    /// sent on it.
    #[error("Redis connection failed")]
    Connection(#[source] ErrorSource),
    /// The connection failed while a command was in flight: it may or may not have been
    /// carried out.
    #[error("the Redis connection failed with the command in flight; the outcome is unknown")]
    Lost(#[source] ErrorSource),
    /// Redis carried the write out, but fewer of its replicas than
    /// [`ThinWsBuilder::redis_wait_replicas`](crate::ThinWsBuilder::redis_wait_replicas)
    /// asks confirmed it in time (how many did): a failover may still lose it, so the
    /// outcome is unknown.
    #[error("only {0} Redis replicas confirmed the write in time; the outcome is unknown")]
    NotReplicated(i64),
    /// Redis answered with an error.
    #[error("Redis answered with an error")]
    Refused(#[source] ErrorSource),
    /// Redis answered something this node did not expect.
    #[error("unexpected reply from Redis: {0}")]
    Protocol(String),
    /// The node's pub/sub connection is down; it is reconnecting.
    #[error("the Redis pub/sub connection is down")]
    SubscriberDown,
    /// A task of the broker has stopped (the layer is being dropped).
    #[error("the broker's {0} has stopped")]
    Stopped(&'static str),
    /// The layer was built on a Redis URL it cannot use, so it serves no sockets and does
    /// nothing on Redis.
    #[error("thinws cannot use its Redis URL")]
    Misconfigured(#[source] Arc<ConnectError>),
}

impl BrokerError {
    /// A connection failure caused by `e`.
    pub(crate) fn connection(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        BrokerError::Connection(Arc::new(e))
    }

    /// Whether the operation may have been carried out all the same: a command was sent and
    /// no answer came ([`BrokerError::Timeout`], [`BrokerError::Lost`]). Every other error
    /// means that nothing was done. Clients see the first kind as `timeout`, the second as
    /// `unavailable`.
    pub fn outcome_unknown(&self) -> bool {
        matches!(
            self,
            BrokerError::Timeout(_) | BrokerError::Lost(_) | BrokerError::NotReplicated(_)
        )
    }
}

/// `report()` on every error type of the boundary.
macro_rules! reportable {
    ($($error:ty),*) => {$(
        impl $error {
            /// The error and its causes in one line (for error replies and logs).
            pub fn report(&self) -> String {
                report(self)
            }
        }
    )*};
}

reportable!(
    ConnectError,
    PublishError,
    HistoryError,
    PresenceError,
    BrokerError
);

impl PublishError {
    /// Whether the message may have been published all the same (see
    /// [`BrokerError::outcome_unknown`]).
    pub fn outcome_unknown(&self) -> bool {
        matches!(self, PublishError::Unavailable(e) if e.outcome_unknown())
    }
}

/// An error and its chain of sources as one line: `a: b: c`.
pub(crate) fn report(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        line.push_str(": ");
        line.push_str(&e.to_string());
        source = e.source();
    }
    line
}

/// Serialises an application payload to raw JSON, for publishing.
pub(crate) fn raw_payload<T: serde::Serialize + ?Sized>(
    payload: &T,
) -> Result<Box<serde_json::value::RawValue>, PublishError> {
    serde_json::value::to_raw_value(payload).map_err(|e| PublishError::InvalidPayload(Arc::new(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_names_every_cause() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = PublishError::Unavailable(BrokerError::connection(io));
        assert_eq!(
            report(&e),
            "Redis unavailable: Redis connection failed: refused"
        );
        assert!(std::error::Error::source(&e).is_some());
        assert!(!e.outcome_unknown());
    }

    #[test]
    fn only_a_sent_unanswered_publish_has_an_unknown_outcome() {
        let timeout = PublishError::from(BrokerError::Timeout(Duration::from_secs(1)));
        assert!(timeout.outcome_unknown());
        assert!(!PublishError::ClusterNode.outcome_unknown());
    }
}

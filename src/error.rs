//! The crate's error types.

use std::sync::Arc;
use std::time::Duration;

/// The underlying cause of a [`BrokerError`], shared between the callers that waited for
/// the same Redis round trip.
pub type ErrorSource = Arc<dyn std::error::Error + Send + Sync>;

/// Errors at the library boundary.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The Redis URL could not be parsed (the password, if any, is redacted).
    #[error("invalid Redis URL {url:?}")]
    InvalidRedisUrl {
        /// The URL, with any password replaced by `***`.
        url: String,
        /// What was wrong with it.
        #[source]
        source: ErrorSource,
    },
    /// Redis could not be used; nothing was published or changed.
    #[error("Redis unavailable")]
    Unavailable(#[from] BrokerError),
    /// A payload could not be serialised to JSON.
    #[error("payload is not serialisable to JSON")]
    InvalidPayload(#[source] serde_json::Error),
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
    /// The layer's Redis URL is unusable, so the node serves no sockets.
    #[error("thinws cannot use its Redis URL")]
    Misconfigured(#[source] ErrorSource),
}

impl Error {
    /// The error and its causes in one line (for error replies and logs).
    pub fn report(&self) -> String {
        report(self)
    }
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
        matches!(self, BrokerError::Timeout(_) | BrokerError::Lost(_))
    }

    /// The error and its causes in one line (for `error` frames and logs).
    pub fn report(&self) -> String {
        report(self)
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
) -> Result<Box<serde_json::value::RawValue>, Error> {
    serde_json::value::to_raw_value(payload).map_err(Error::InvalidPayload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_names_every_cause() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = Error::Unavailable(BrokerError::connection(io));
        assert_eq!(
            report(&e),
            "Redis unavailable: Redis connection failed: refused"
        );
        assert!(std::error::Error::source(&e).is_some());
    }
}

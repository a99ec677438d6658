//! What a publish with an idempotency key did: [`Idempotent`] (protocol 1.2; see
//! [`Hub::publish_once`](crate::Hub::publish_once) and
//! [`Publisher::publish_once`](crate::Publisher::publish_once)).

use crate::broker::Accepted;
use crate::error::PublishError;
use crate::protocol::MAX_KEY_LEN;

/// What a publish with an idempotency key did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Idempotent {
    /// Published now: the key was not recorded within the room's idempotency window.
    Published,
    /// The key was recorded within the window: the message went out before and was not
    /// published again.
    Duplicate,
}

impl Idempotent {
    pub(crate) fn of(accepted: &Accepted) -> Self {
        match accepted.duplicate {
            true => Idempotent::Duplicate,
            false => Idempotent::Published,
        }
    }
}

/// A key's length, checked as a client's is: 1 to [`MAX_KEY_LEN`] bytes.
pub(crate) fn check_key(key: &str) -> Result<(), PublishError> {
    match key.is_empty() || key.len() > MAX_KEY_LEN {
        true => Err(PublishError::InvalidKey),
        false => Ok(()),
    }
}

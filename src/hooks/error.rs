//! What a hook's error tells the client.
//!
//! A hook that fails with any error refuses safely: the client gets `internal`. A hook can
//! say more by failing with a [`HookError`]: `unavailable` when what it asks (a backend, a
//! database) did not answer (nothing happened, the client may try again), or a refusal with
//! a protocol code of its choosing.

use crate::protocol::ErrorCode;

use super::BoxError;

/// An error a hook returns to choose the client's `error` frame.
///
/// ```
/// use thinws::hooks::{HookError, SubscribeEvent, Verdict};
/// use thinws::protocol::ErrorCode;
/// use tower::service_fn;
///
/// let hook = service_fn(|event: SubscribeEvent| async move {
///     if event.room().len() > 64 {
///         return Err(HookError::refused(ErrorCode::InvalidMessage, "room names are short here"));
///     }
///     Ok(Verdict::Allow)
/// });
/// let layer = thinws::ThinWsLayer::builder().on_subscribe(hook).build();
/// # let _ = layer;
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HookError {
    /// What the hook asks could not answer in time, or answered nonsense: the client gets
    /// `unavailable` (nothing happened).
    #[error("the hook's backend is unavailable")]
    Unavailable(#[source] BoxError),
    /// Refused with this code and message (a code for an operation that failed, e.g.
    /// `forbidden`, `invalid_message`, `limit_exceeded`).
    #[error("refused with {code}: {message}")]
    Refused {
        /// The code the client gets.
        code: ErrorCode,
        /// The message the client gets.
        message: String,
    },
}

impl HookError {
    /// [`HookError::Unavailable`] caused by `source`.
    pub fn unavailable(source: impl Into<BoxError>) -> Self {
        HookError::Unavailable(source.into())
    }

    /// [`HookError::Refused`] with `code` and `message`.
    pub fn refused(code: ErrorCode, message: impl Into<String>) -> Self {
        HookError::Refused {
            code,
            message: message.into(),
        }
    }
}

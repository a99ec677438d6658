//! Why a socket's operation was refused, as the `error` frame says it.

use crate::error::report;
use crate::error::BrokerError;
use crate::hooks::{BoxError, HookError};
use crate::protocol::ErrorCode;

/// Why an operation was refused; becomes the `error` frame's code and message.
#[derive(Debug)]
pub(super) enum Refusal {
    Broker(BrokerError),
    /// A read from the broker failed: nothing was changed, whatever the error.
    BrokerRead(BrokerError),
    /// A hook refused, with this reason.
    Forbidden(String),
    /// A hook failed while deciding on this kind of operation.
    HookFailed(&'static str),
    /// A hook said what it could not reach (`unavailable`), for this kind of operation.
    HookUnavailable(&'static str),
    /// A hook refused with its own code and message.
    HookRefused(ErrorCode, String),
    /// The socket is in its most rooms.
    TooManyRooms(usize),
    /// The identity has recorded its most rooms.
    IdentityFull(usize),
    /// A second `connect` with another identity.
    OtherIdentity,
    /// The room has this feature off.
    NotEnabled(&'static str),
    /// A `subscribe` with `since` to a room the socket is in already.
    AlreadyIn,
    /// The identity a `connect` would bind (claimed, or assigned by its hook) cannot be
    /// used: this says why.
    BadIdentity(String),
}

impl Refusal {
    pub(super) fn hook_failed(event: &'static str, e: BoxError) -> Self {
        match e.downcast::<HookError>() {
            Ok(e) => match *e {
                HookError::Refused { code, message } => Refusal::HookRefused(code, message),
                HookError::Unavailable(source) => {
                    tracing::warn!(event, error = %report(&*source), "hook's backend unavailable; nothing done");
                    crate::metrics::hook_unavailable(event);
                    Refusal::HookUnavailable(event)
                }
            },
            Err(e) => {
                tracing::warn!(event, error = %e, "hook failed; refusing");
                Refusal::HookFailed(event)
            }
        }
    }

    pub(super) fn code(&self) -> ErrorCode {
        match self {
            Refusal::Broker(e) if e.outcome_unknown() => ErrorCode::Timeout,
            Refusal::Broker(_) | Refusal::BrokerRead(_) => ErrorCode::Unavailable,
            Refusal::Forbidden(_) => ErrorCode::Forbidden,
            Refusal::HookFailed(_) => ErrorCode::Internal,
            Refusal::HookUnavailable(_) => ErrorCode::Unavailable,
            Refusal::HookRefused(code, _) => *code,
            Refusal::TooManyRooms(_) | Refusal::IdentityFull(_) => ErrorCode::LimitExceeded,
            Refusal::OtherIdentity | Refusal::BadIdentity(_) | Refusal::AlreadyIn => {
                ErrorCode::InvalidMessage
            }
            Refusal::NotEnabled(_) => ErrorCode::NotEnabled,
        }
    }

    pub(super) fn message(&self) -> String {
        match self {
            Refusal::Broker(e) | Refusal::BrokerRead(e) => e.report(),
            Refusal::Forbidden(reason) => reason.clone(),
            Refusal::HookFailed(event) => format!("the server could not decide on this {event}"),
            Refusal::HookUnavailable(event) => {
                format!("the server could not decide on this {event} now: nothing was done")
            }
            Refusal::HookRefused(_, message) => message.clone(),
            Refusal::TooManyRooms(max) => format!("a socket may be in at most {max} rooms"),
            Refusal::IdentityFull(max) => {
                format!("an identity may record at most {max} rooms: unsubscribe one first")
            }
            Refusal::NotEnabled(what) => (*what).to_owned(),
            Refusal::BadIdentity(why) => why.clone(),
            Refusal::AlreadyIn => "already subscribed to this room: since recovers only on a new subscription (unsubscribe first, or ask history)".into(),
            Refusal::OtherIdentity => {
                "this socket is already connected with another connectionID".into()
            }
        }
    }
}

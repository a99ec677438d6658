use std::borrow::Cow;
use std::fmt;

use serde_json::value::RawValue;

/// The stable, machine-readable `code` of an `error` frame.
///
/// Clients match on these strings; they never change meaning between releases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// The frame was not valid JSON (or nested too deeply to read safely).
    InvalidJson,
    /// A required field was missing or had the wrong type, or the frame was not an object.
    InvalidMessage,
    /// The `type` field named no known operation.
    UnknownType,
    /// The frame was binary; the protocol uses text frames only.
    InvalidFrame,
    /// A field (`roomID`, `connectionID`) was longer than the configured limit.
    TooLarge,
    /// A hook refused the operation.
    Forbidden,
    /// The socket sent too many frames too fast.
    RateLimited,
    /// The broker (Redis) could not be reached; nothing was published or subscribed.
    Unavailable,
    /// The broker (Redis) did not answer in time after the operation was sent: it may or
    /// may not have been carried out. Not safe to retry blindly (a message could arrive
    /// twice).
    Timeout,
    /// The socket joined too many rooms.
    LimitExceeded,
    /// `history` (or, later, `presence`) on a room that has it off (protocol 1.1).
    NotEnabled,
    /// An unexpected server-side failure.
    Internal,
}

impl ErrorCode {
    /// The code as it appears on the wire, e.g. `"invalid_json"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::InvalidMessage => "invalid_message",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::InvalidFrame => "invalid_frame",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Timeout => "timeout",
            ErrorCode::LimitExceeded => "limit_exceeded",
            ErrorCode::NotEnabled => "not_enabled",
            ErrorCode::Internal => "internal",
        }
    }

    /// Every code, for tables and tests.
    pub const ALL: [ErrorCode; 12] = [
        ErrorCode::InvalidJson,
        ErrorCode::InvalidMessage,
        ErrorCode::UnknownType,
        ErrorCode::InvalidFrame,
        ErrorCode::TooLarge,
        ErrorCode::Forbidden,
        ErrorCode::RateLimited,
        ErrorCode::Unavailable,
        ErrorCode::Timeout,
        ErrorCode::LimitExceeded,
        ErrorCode::NotEnabled,
        ErrorCode::Internal,
    ];
}

/// A `code` this version of the protocol does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown error code {0:?}")]
#[non_exhaustive]
pub struct UnknownErrorCode(pub String);

impl std::str::FromStr for ErrorCode {
    type Err = UnknownErrorCode;

    /// Reads a code as it appears on the wire.
    ///
    /// ```
    /// use thinws::protocol::ErrorCode;
    /// assert_eq!("rate_limited".parse(), Ok(ErrorCode::RateLimited));
    /// assert!("nope".parse::<ErrorCode>().is_err());
    /// ```
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ErrorCode::ALL
            .into_iter()
            .find(|code| code.as_str() == s)
            .ok_or_else(|| UnknownErrorCode(s.to_owned()))
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a client frame was refused: the code and message for the `error` frame, and the
/// frame's `messageID` when it was readable (a string or a number).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct FrameError<'a> {
    /// The `messageID` to echo, if the frame had a readable one.
    pub message_id: Option<&'a RawValue>,
    /// The error code.
    pub code: ErrorCode,
    /// A human-readable explanation.
    pub message: Cow<'static, str>,
}

impl<'a> FrameError<'a> {
    /// A new error for a frame with the given readable `messageID`.
    pub fn new(
        message_id: Option<&'a RawValue>,
        code: ErrorCode,
        message: impl Into<Cow<'static, str>>,
    ) -> Self {
        FrameError {
            message_id,
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for FrameError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for FrameError<'_> {}

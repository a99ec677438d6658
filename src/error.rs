//! The crate's error type.

/// Errors at the library boundary.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The Redis URL could not be parsed (the password, if any, is redacted).
    #[error("invalid Redis URL {url:?}: {reason}")]
    InvalidRedisUrl {
        /// The URL, with any password replaced by `***`.
        url: String,
        /// What was wrong with it.
        reason: String,
    },
    /// Redis could not be reached, or did not answer in time.
    #[error("Redis unavailable: {0}")]
    Unavailable(String),
    /// A payload could not be serialised to JSON.
    #[error("payload is not serialisable to JSON: {0}")]
    InvalidPayload(String),
}

/// Serialises an application payload to raw JSON, for publishing.
pub(crate) fn raw_payload<T: serde::Serialize + ?Sized>(
    payload: &T,
) -> Result<Box<serde_json::value::RawValue>, Error> {
    serde_json::value::to_raw_value(payload).map_err(|e| Error::InvalidPayload(e.to_string()))
}

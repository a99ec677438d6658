//! The ThinWS wire protocol, version 1: frame types, parsing with limits, error codes.
//!
//! This module is pure: it does no I/O. Every frame is one UTF-8 text WebSocket frame holding
//! one JSON object. [`parse`] turns a client's text into a [`ClientFrame`] that borrows from
//! the text (payloads are kept as raw JSON and never re-serialised), or into a
//! [`FrameError`] that says which [`ErrorCode`] to answer with and whether the frame had a
//! readable `messageID` to echo. The [`server`] encoders build the frames the server sends.
//!
//! The full contract is in `docs/PROTOCOL.md` in the repository.
//!
//! # Example
//!
//! ```
//! use thinws::protocol::{self, Command, ErrorCode, Limits};
//!
//! let limits = Limits::default();
//! let frame = protocol::parse(
//!     r#"{"type":"message","messageID":7,"roomID":"lobby","payload":{"text":"hi"}}"#,
//!     &limits,
//! )
//! .unwrap();
//! assert_eq!(frame.message_id.get(), "7");
//! match frame.command {
//!     Command::Message { room, payload, .. } => {
//!         assert_eq!(room, "lobby");
//!         assert_eq!(payload.get(), r#"{"text":"hi"}"#);
//!     }
//!     _ => unreachable!(),
//! }
//!
//! let err = protocol::parse(r#"{"type":"subscribe","messageID":"a","roomID":5}"#, &limits)
//!     .unwrap_err();
//! assert_eq!(err.code, ErrorCode::InvalidMessage);
//! assert_eq!(err.message, "roomID must be a string");
//! assert_eq!(err.message_id.map(|id| id.get()), Some(r#""a""#));
//! ```

mod client;
mod encode;
mod error;
mod json;
mod scan;
pub mod server;

pub use client::{parse, ClientFrame, Command, Limits, Since, MAX_KEY_LEN};
pub use encode::encode;
pub use error::{ErrorCode, FrameError, UnknownErrorCode};
pub(crate) use scan::payload_problem;

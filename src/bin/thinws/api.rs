//! The server-side HTTP API, for backends in any language (Django, Rails, PHP):
//!
//! - `POST /api/publish` with `{"roomID": "...", "payload": ...}` publishes to the room as
//!   [`Hub::publish`](thinws::Hub::publish) does and answers with the broker's verdict:
//!   `200 {"ok":true}`, `503 {"error":"unavailable",...}` (nothing was sent) or
//!   `504 {"error":"timeout",...}` (sent, no answer in time: the outcome is unknown);
//! - `GET /api/rooms/{roomID}` answers `{"roomID":...,"localMembers":n}` (this node's
//!   members of the room);
//! - `GET /api/rooms/{roomID}/history[?limit=N]` answers the room's kept messages, oldest
//!   first, with its `offset` and `epoch` (404 `not_enabled` for a room without history);
//! - `GET /api/rooms/{roomID}/presence` answers `{"roomID":...,"count":n,"members":[...]}`:
//!   who is in the room on every node (404 `not_enabled` for a room without presence).
//!
//! All need `Authorization: apikey KEY` with the server's `--api-key`, compared in
//! constant time; without `--api-key` the API is off (404).

use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use serde::{Deserialize, Serialize};
use serde_json::json;
use serde_json::value::RawValue;
use subtle::ConstantTimeEq;
use thinws::protocol::{self, Command, ErrorCode, Limits};
use thinws::{Hub, Idempotent, PresenceError};

/// The API's state.
#[derive(Clone)]
pub struct Api {
    hub: Hub,
    key: Option<Arc<[u8]>>,
    limits: Limits,
    /// Largest accepted request body (`--max-frame-size`, a socket's frame limit).
    max_body: usize,
}

#[derive(Deserialize)]
struct PublishBody<'a> {
    #[serde(rename = "roomID", borrow)]
    room: &'a RawValue,
    #[serde(borrow)]
    payload: &'a RawValue,
    /// The idempotency key (a string; also taken from the `Idempotency-Key` header). Kept
    /// raw, so that `null` is refused as a socket's `key: null` is.
    #[serde(
        rename = "idempotencyKey",
        borrow,
        default,
        deserialize_with = "present"
    )]
    key: Option<&'a RawValue>,
}

/// A room's history as the API answers it (`json!` would parse the messages again).
#[derive(Serialize)]
struct HistoryBody<'a> {
    #[serde(rename = "roomID")]
    room: &'a str,
    offset: u64,
    epoch: &'a str,
    messages: Vec<&'a RawValue>,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&'de RawValue as Deserialize>::deserialize(d).map(Some)
}

fn json_response(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    json_text(status, body.to_string())
}

/// A response of JSON text already written.
fn json_text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

fn error(status: StatusCode, code: &str, message: &str) -> Response<Full<Bytes>> {
    json_response(status, json!({"error": code, "message": message}))
}

impl Api {
    pub fn new(hub: Hub, key: Option<String>, max_body: usize) -> Self {
        Api {
            hub,
            key: key.map(|key| Arc::from(key.into_bytes())),
            limits: Limits::default(),
            max_body,
        }
    }

    /// Whether `path` is the API's.
    pub fn handles(path: &str) -> bool {
        path == "/api" || path.starts_with("/api/")
    }

    fn authorized<B>(&self, key: &[u8], request: &Request<B>) -> bool {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("apikey "))
            .unwrap_or("");
        given.as_bytes().ct_eq(key).into()
    }

    pub async fn respond<B>(&self, request: Request<B>) -> Response<Full<Bytes>>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let Some(key) = &self.key else {
            return error(
                StatusCode::NOT_FOUND,
                "not_enabled",
                "the API is off: start the server with --api-key",
            );
        };
        if !self.authorized(key, &request) {
            let mut refused = error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "send Authorization: apikey KEY",
            );
            // RFC 9110: a 401 names the scheme it wants.
            refused.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("apikey"),
            );
            return refused;
        }
        let path = request.uri().path().to_owned();
        match (request.method(), path.as_str()) {
            (&Method::POST, "/api/publish") => self.publish(request).await,
            (&Method::GET, path)
                if path.starts_with("/api/rooms/") && path.ends_with("/history") =>
            {
                let Some(room) = room_in(path, "/history") else {
                    return no_room();
                };
                let limit = request
                    .uri()
                    .query()
                    .and_then(|q| q.split('&').find_map(|p| p.strip_prefix("limit=")));
                let limit = match limit.map(str::parse::<usize>) {
                    None => None,
                    Some(Ok(limit)) => Some(limit),
                    // As a socket's `history` refuses it.
                    Some(Err(_)) => {
                        return error(
                            StatusCode::BAD_REQUEST,
                            "invalid_message",
                            "limit must be a whole number",
                        )
                    }
                };
                self.history(&room, limit).await
            }
            (&Method::GET, path)
                if path.starts_with("/api/rooms/") && path.ends_with("/presence") =>
            {
                let Some(room) = room_in(path, "/presence") else {
                    return no_room();
                };
                match self.hub.presence(&room).await {
                    Ok(Some(presence)) => json_response(
                        StatusCode::OK,
                        json!({"roomID": room, "count": presence.count, "members": presence.members}),
                    ),
                    Ok(None) => error(
                        StatusCode::NOT_FOUND,
                        ErrorCode::NotEnabled.as_str(),
                        "this room does not track presence",
                    ),
                    Err(e @ PresenceError::InvalidMember { .. }) => {
                        tracing::error!(room = %room, error = %e.report(), "presence read");
                        error(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            ErrorCode::Internal.as_str(),
                            "a presence member kept in Redis could not be read",
                        )
                    }
                    Err(e) => unavailable(&e.report()),
                }
            }
            (&Method::GET, room) if room.starts_with("/api/rooms/") => {
                let room = &room["/api/rooms/".len()..];
                match percent_encoding::percent_decode_str(room).decode_utf8() {
                    Ok(room) if !room.is_empty() => json_response(
                        StatusCode::OK,
                        json!({"roomID": room, "localMembers": self.hub.member_count(&room)}),
                    ),
                    _ => error(
                        StatusCode::BAD_REQUEST,
                        "invalid_message",
                        "no valid roomID in the path",
                    ),
                }
            }
            _ => error(StatusCode::NOT_FOUND, "not_found", "no such API endpoint"),
        }
    }

    async fn history(&self, room: &str, limit: Option<usize>) -> Response<Full<Bytes>> {
        match self.hub.history(room, limit).await {
            Ok(Some(history)) => {
                // As delivered, byte for byte (a `Value` would reorder keys and reformat
                // numbers).
                let messages: Vec<&RawValue> = history
                    .messages
                    .iter()
                    .filter_map(|m| match serde_json::from_str(m) {
                        Ok(raw) => Some(raw),
                        Err(e) => {
                            tracing::error!(room, error = %e, "a kept message is not JSON");
                            None
                        }
                    })
                    .collect();
                let body = HistoryBody {
                    room,
                    offset: history.offset,
                    epoch: &history.epoch,
                    messages,
                };
                let body = serde_json::to_string(&body).expect("the history is JSON");
                json_text(StatusCode::OK, body)
            }
            Ok(None) => error(
                StatusCode::NOT_FOUND,
                ErrorCode::NotEnabled.as_str(),
                "this room keeps no history",
            ),
            Err(e) => unavailable(&e.report()),
        }
    }

    async fn publish<B>(&self, request: Request<B>) -> Response<Full<Bytes>>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let mut keys = request.headers().get_all("idempotency-key").iter();
        let header_key = match (keys.next().map(|v| v.to_str()), keys.next()) {
            (None, _) => None,
            (Some(Ok(key)), None) => Some(key.to_owned()),
            (Some(Ok(_)), Some(_)) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid_message",
                    "more than one Idempotency-Key header",
                )
            }
            (Some(Err(_)), _) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid_message",
                    "the Idempotency-Key header is not visible ASCII",
                )
            }
        };
        let body = match Limited::new(request.into_body(), self.max_body)
            .collect()
            .await
        {
            Ok(body) => body.to_bytes(),
            Err(e) if e.is::<LengthLimitError>() => {
                let message = format!("the body is over {} bytes", self.max_body);
                return error(StatusCode::PAYLOAD_TOO_LARGE, "too_large", &message);
            }
            Err(e) => {
                let message = format!("the body could not be read: {e}");
                return error(StatusCode::BAD_REQUEST, "invalid_message", &message);
            }
        };
        let Ok(text) = std::str::from_utf8(&body) else {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                "the body is not UTF-8",
            );
        };
        // JSON, then an object (serde would read an array into the fields by position),
        // then one with the fields a publish needs.
        let raw: &RawValue = match serde_json::from_str(text) {
            Ok(raw) => raw,
            Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_json", &e.to_string()),
        };
        if !raw.get().starts_with('{') {
            let message = "the body is not a JSON object";
            return error(StatusCode::BAD_REQUEST, "invalid_message", message);
        }
        let fields: PublishBody<'_> = match serde_json::from_str(raw.get()) {
            Ok(fields) => fields,
            Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_message", &e.to_string()),
        };
        // The key in the body, or else the header's (as a JSON string).
        let header_key = header_key.map(|key| serde_json::Value::from(key).to_string());
        let key = match (fields.key.map(RawValue::get), header_key.as_deref()) {
            (Some(body), Some(header))
                if serde_json::from_str::<serde_json::Value>(body).ok()
                    != serde_json::from_str::<serde_json::Value>(header).ok() =>
            {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid_message",
                    "idempotencyKey and the Idempotency-Key header differ",
                )
            }
            (Some(key), _) | (None, Some(key)) => format!(r#","key":{key}"#),
            (None, None) => String::new(),
        };
        // The same checks as a socket's `message` (lengths, nesting, numbers, surrogates).
        let frame = format!(
            r#"{{"type":"message","messageID":0,"roomID":{},"payload":{}{key}}}"#,
            fields.room.get(),
            fields.payload.get()
        );
        let parsed = match protocol::parse(&frame, &self.limits) {
            Ok(parsed) => parsed,
            Err(e) => {
                return error(StatusCode::BAD_REQUEST, e.code.as_str(), &e.message);
            }
        };
        let Command::Message { room, payload, key } = parsed.command else {
            return error(StatusCode::BAD_REQUEST, "invalid_message", "not a message");
        };
        let published = match key {
            None => self.hub.publish_raw(&room, payload).await.map(|()| false),
            Some(key) => (self.hub.publish_once(&room, &key, payload).await)
                .map(|done| done == Idempotent::Duplicate),
        };
        match published {
            Ok(false) => json_response(StatusCode::OK, json!({"ok": true})),
            Ok(true) => json_response(StatusCode::OK, json!({"ok": true, "duplicate": true})),
            Err(e) if e.outcome_unknown() => error(
                StatusCode::GATEWAY_TIMEOUT,
                ErrorCode::Timeout.as_str(),
                &e.report(),
            ),
            Err(e) => unavailable(&e.report()),
        }
    }
}

/// The room named in `path` (`/api/rooms/{roomID}{suffix}`), percent-decoded.
fn room_in(path: &str, suffix: &str) -> Option<String> {
    let room = path.strip_prefix("/api/rooms/")?.strip_suffix(suffix)?;
    percent_encoding::percent_decode_str(room)
        .decode_utf8()
        .ok()
        .filter(|room| !room.is_empty())
        .map(|room| room.into_owned())
}

fn no_room() -> Response<Full<Bytes>> {
    error(
        StatusCode::BAD_REQUEST,
        "invalid_message",
        "no valid roomID in the path",
    )
}

fn unavailable(report: &str) -> Response<Full<Bytes>> {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Unavailable.as_str(),
        report,
    )
}

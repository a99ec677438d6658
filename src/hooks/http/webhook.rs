//! The notification hook that POSTs each [`Notification`] to a URL (a webhook).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::UNIX_EPOCH;

use http::{StatusCode, Uri};
use serde::Serialize;
use tower_service::Service;

use super::backend::{parse_url, Backend, InvalidHookUrl};
use super::wire::SocketBody;
use crate::hooks::{DisconnectReason, Happened, HookError, Notification};
use crate::protocol::ErrorCode;

/// A notification hook that POSTs each notification to one URL, signed like the proxy
/// hooks (see [`Backend::webhook`]).
#[derive(Clone)]
pub struct Webhook {
    backend: Backend,
    url: Arc<Uri>,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook").field("url", &self.url).finish()
    }
}

impl Webhook {
    pub(super) fn new(backend: Backend, url: &str) -> Result<Self, InvalidHookUrl> {
        Ok(Webhook {
            url: Arc::new(parse_url(url)?),
            backend,
        })
    }
}

impl Service<Notification> for Webhook {
    type Response = ();
    type Error = HookError;
    type Future = Pin<Box<dyn Future<Output = Result<(), HookError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), HookError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, notification: Notification) -> Self::Future {
        let (backend, url) = (self.backend.clone(), self.url.clone());
        Box::pin(async move {
            let (event, body) = body(&notification, backend.node());
            let (status, _) = backend.exchange(&url, event, None, body).await?;
            outcome(status)
        })
    }
}

/// What the backend's answer means: taken (2xx); refused for good (400, 413, 415 or 422:
/// the backend will not take this body however often it is sent, so the node drops it,
/// counted and logged, rather than hold up its lane for ever); or not taken yet (any other
/// answer, 401, 403 and 404 included, which a secret being rotated or a deploy can give
/// for a while: sent again after a pause).
fn outcome(status: StatusCode) -> Result<(), HookError> {
    let answered = || format!("the webhook backend answered {status}");
    let refused_for_good = [
        StatusCode::BAD_REQUEST,
        StatusCode::PAYLOAD_TOO_LARGE,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        StatusCode::UNPROCESSABLE_ENTITY,
    ];
    if status.is_success() {
        Ok(())
    } else if refused_for_good.contains(&status) {
        Err(HookError::refused(ErrorCode::InvalidMessage, answered()))
    } else {
        Err(HookError::unavailable(answered()))
    }
}

#[derive(Serialize)]
struct Body<'a> {
    event: &'static str,
    node: &'a str,
    /// Milliseconds since the Unix epoch, when the node learnt it.
    time: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    room: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    identity: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    socket: Option<SocketBody<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'static str>,
}

/// The event's name and the request body of `notification`.
fn body(notification: &Notification, node: &str) -> (&'static str, Vec<u8>) {
    let time = notification
        .at()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX));
    let mut body = Body {
        event: "",
        node,
        time,
        room: notification.room(),
        seq: None,
        identity: None,
        socket: None,
        reason: None,
    };
    match notification.what() {
        Happened::RoomOccupied { seq, .. } => {
            (body.event, body.seq) = ("room_occupied", Some(*seq))
        }
        Happened::RoomVacated { seq, .. } => (body.event, body.seq) = ("room_vacated", Some(*seq)),
        Happened::Join { identity, seq, .. } => {
            (body.event, body.identity, body.seq) = ("join", Some(&**identity), Some(*seq))
        }
        Happened::Leave { identity, seq, .. } => {
            (body.event, body.identity, body.seq) = ("leave", Some(&**identity), Some(*seq))
        }
        Happened::Disconnect { socket, reason } => {
            body.event = "disconnect";
            body.socket = Some(SocketBody::of(socket));
            body.reason = Some(reason_name(*reason));
        }
    }
    let event = body.event;
    (
        event,
        serde_json::to_vec(&body).expect("the body is plain JSON"),
    )
}

fn reason_name(reason: DisconnectReason) -> &'static str {
    match reason {
        DisconnectReason::Requested => "requested",
        DisconnectReason::Closed => "closed",
        DisconnectReason::Lost => "lost",
        DisconnectReason::TimedOut => "timed_out",
        DisconnectReason::Server => "server",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_follow_the_contract() {
        let occupied = Notification::now(Happened::RoomOccupied {
            room: "lobby".into(),
            seq: 3,
        });
        let (event, json) = body(&occupied, "n1");
        let json: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(event, "room_occupied");
        assert_eq!(json["event"], "room_occupied");
        assert_eq!(json["room"], "lobby");
        assert_eq!(json["seq"], 3);
        assert_eq!(json["node"], "n1");
        assert!(json["time"].as_u64().unwrap() > 1_700_000_000_000);
        assert!(json.get("identity").is_none());

        let join = Notification::now(Happened::Join {
            room: "chat".into(),
            identity: "al\"ice".into(),
            seq: 9,
        });
        let (event, json) = body(&join, "n1");
        let json: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!((event, &json["identity"]), ("join", &"al\"ice".into()));
        assert_eq!(json["seq"], 9);
    }

    #[test]
    fn a_permanent_refusal_is_dropped_and_anything_else_sent_again() {
        let refused = |code: u16| {
            matches!(
                outcome(StatusCode::from_u16(code).unwrap()),
                Err(HookError::Refused { .. })
            )
        };
        assert!(outcome(StatusCode::NO_CONTENT).is_ok());
        assert!([400, 413, 415, 422].into_iter().all(refused));
        assert!(![401, 403, 404, 408, 409, 429, 500, 502, 503]
            .into_iter()
            .any(refused));
        assert!(outcome(StatusCode::SERVICE_UNAVAILABLE).is_err());
    }
}

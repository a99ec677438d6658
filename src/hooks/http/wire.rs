//! The JSON of the HTTP hooks (see `docs/hooks/`): the request body of each event, and
//! the backend's answer turned into the hook's verdict.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;

use crate::hooks::{
    ConnectEvent, ConnectVerdict, Grant, HookError, MessageEvent, MessageVerdict, RefreshEvent,
    RefreshVerdict, SocketInfo, SubscribeEvent, Verdict,
};
use crate::protocol::ErrorCode;

/// The largest `meta` a backend may attach to a socket.
const MAX_META: usize = 4 * 1024;

/// The `meta` a backend attached to a socket (in a `connect` or `refresh` answer): sent
/// back with every later event of the socket, and readable by other hooks through
/// [`SocketInfo::granted`].
#[derive(Debug, Clone)]
pub struct Meta(Arc<RawValue>);

impl Meta {
    /// The JSON, as the backend sent it.
    pub fn get(&self) -> &RawValue {
        &self.0
    }
}

/// An event an HTTP hook sends (sealed: implemented for the four events only).
pub trait ProxyEvent: Send + 'static {
    /// `X-Thinws-Event` and the body's `event`.
    const NAME: &'static str;
    /// What the hook answers.
    type Verdict: Send + 'static;

    fn socket(&self) -> &SocketInfo;

    /// The room the event is about, if any (for [`Backend::rooms_with_prefix`]).
    ///
    /// [`Backend::rooms_with_prefix`]: super::BackendBuilder::rooms_with_prefix
    fn room(&self) -> Option<&str> {
        None
    }

    /// The verdict when the backend is not asked (a room it does not want to hear about).
    fn unasked() -> Self::Verdict;

    /// The request body.
    fn body(&self, node: &str) -> Vec<u8>;

    /// The verdict of the backend's `result`.
    fn verdict(self, answer: Answer) -> Result<Self::Verdict, HookError>;
}

#[derive(Serialize)]
struct Body<'a> {
    event: &'static str,
    node: &'a str,
    socket: SocketBody<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    room: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<&'a str>,
}

/// The `socket` of a request or webhook body: its id, bound identity and `meta`.
#[derive(Serialize)]
pub(super) struct SocketBody<'a> {
    id: String,
    identity: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    meta: Option<&'a RawValue>,
}

impl<'a> SocketBody<'a> {
    pub(super) fn of(socket: &'a SocketInfo) -> Self {
        SocketBody {
            id: socket.id().to_string(),
            identity: socket.has_bound_identity().then(|| socket.connection_id()),
            meta: socket.granted().get::<Meta>().map(Meta::get),
        }
    }
}

fn body<E: ProxyEvent>(
    event: &E,
    node: &str,
    room: Option<&str>,
    payload: Option<&RawValue>,
    token: Option<&str>,
) -> Vec<u8> {
    let socket = event.socket();
    let body = Body {
        event: E::NAME,
        node,
        socket: SocketBody::of(socket),
        room,
        payload,
        token,
    };
    serde_json::to_vec(&body).expect("the body is plain JSON")
}

/// The backend's answer: `{"result": {…}}` or `{"error": {"code": …, "message": …}}`.
/// Each is read as a JSON object only: serde would read an array into the same fields by
/// position (`{"result": ["mallory"]}` naming an identity).
#[derive(Debug, Deserialize)]
pub struct Answer {
    #[serde(default, deserialize_with = "present")]
    result: Option<Box<RawValue>>,
    #[serde(default, deserialize_with = "present")]
    error: Option<Box<RawValue>>,
}

/// What a `result` may hold. A field the backend sends as `null` is a failure of the
/// backend, not a field left out (`"identity": null` would bind the identity the client
/// claimed), except `meta` and `payload`, where `null` is a value.
#[derive(Debug, Default, Deserialize)]
struct Result_ {
    #[serde(default, deserialize_with = "not_null")]
    identity: Option<String>,
    #[serde(default, deserialize_with = "present")]
    meta: Option<Box<RawValue>>,
    #[serde(default, deserialize_with = "present")]
    payload: Option<Box<RawValue>>,
    #[serde(default, rename = "expireAt", deserialize_with = "not_null")]
    expire_at: Option<u64>,
    #[serde(default, deserialize_with = "not_null")]
    rooms: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
struct ErrorBody {
    code: String,
    #[serde(default)]
    message: String,
}

/// Tells a field that is `null` (`Some("null")`) from a missing one (`None`).
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Box<RawValue>>, D::Error> {
    Box::<RawValue>::deserialize(d).map(Some)
}

/// A field that, when present, must hold a `T` (`null` is refused; a missing field is
/// `None` by `default`).
fn not_null<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// `raw` read as a `T`, if it is a JSON object.
fn object<T: DeserializeOwned>(raw: &RawValue, what: &str) -> Result<T, HookError> {
    if !raw.get().starts_with('{') {
        return Err(HookError::unavailable(format!(
            "the backend's {what} is not a JSON object"
        )));
    }
    serde_json::from_str(raw.get()).map_err(|e| {
        HookError::unavailable(format!("the backend's {what} is not a hook answer's: {e}"))
    })
}

impl Answer {
    pub(crate) fn parse(body: &[u8]) -> Result<Answer, HookError> {
        let not_an_answer = |e: String| {
            HookError::unavailable(format!("the backend's answer is not a hook answer: {e}"))
        };
        if body.trim_ascii_start().first() != Some(&b'{') {
            return Err(not_an_answer("not a JSON object".into()));
        }
        serde_json::from_slice(body).map_err(|e| not_an_answer(e.to_string()))
    }

    /// The `result`, or the refusal the backend chose (an unknown code is `forbidden`).
    fn result(self) -> Result<Result_, HookError> {
        match (self.result, self.error) {
            (_, Some(error)) => {
                let error: ErrorBody = object(&error, "error")?;
                let code = error.code.parse().unwrap_or(ErrorCode::Forbidden);
                Err(HookError::refused(code, error.message))
            }
            (Some(result), None) => object(&result, "result"),
            (None, None) => Err(HookError::unavailable(
                "the backend's answer has neither result nor error",
            )),
        }
    }
}

impl Result_ {
    /// A grant of the answer's identity, `rooms`, `meta` and `expireAt`.
    fn grant(self) -> Result<Grant, HookError> {
        let mut grant = Grant::new();
        if let Some(identity) = self.identity {
            if identity.is_empty() {
                return Err(HookError::unavailable(
                    "the backend assigned an empty identity",
                ));
            }
            grant = grant.identity(identity);
        }
        for room in self.rooms.into_iter().flatten() {
            grant = grant.room(room);
        }
        if let Some(meta) = self.meta {
            if meta.get().len() > MAX_META {
                return Err(HookError::unavailable(format!(
                    "the backend's meta is over {MAX_META} bytes"
                )));
            }
            grant = grant.with(Meta(Arc::from(meta)));
        }
        if let Some(at) = self.expire_at {
            // Seconds, not milliseconds: beyond ten years it is taken for a mistake.
            let now = SystemTime::now();
            let at = UNIX_EPOCH
                .checked_add(Duration::from_secs(at))
                .filter(|at| *at <= now + Duration::from_secs(10 * 365 * 24 * 60 * 60))
                .ok_or_else(|| {
                    HookError::unavailable(
                        "the backend's expireAt is not Unix seconds within ten years",
                    )
                })?;
            if at <= now {
                return Err(HookError::refused(
                    ErrorCode::Forbidden,
                    "the credential has expired",
                ));
            }
            grant = grant.expires_at(at);
        }
        Ok(grant)
    }
}

impl ProxyEvent for ConnectEvent {
    const NAME: &'static str = "connect";
    type Verdict = ConnectVerdict;

    fn socket(&self) -> &SocketInfo {
        &self.socket
    }

    fn unasked() -> ConnectVerdict {
        ConnectVerdict::Accept
    }

    fn body(&self, node: &str) -> Vec<u8> {
        body(self, node, None, None, self.token.as_deref())
    }

    fn verdict(self, answer: Answer) -> Result<ConnectVerdict, HookError> {
        Ok(ConnectVerdict::Grant(answer.result()?.grant()?))
    }
}

impl ProxyEvent for SubscribeEvent {
    const NAME: &'static str = "subscribe";
    type Verdict = Verdict;

    fn socket(&self) -> &SocketInfo {
        &self.socket
    }

    fn room(&self) -> Option<&str> {
        Some(&self.room)
    }

    fn unasked() -> Verdict {
        Verdict::Allow
    }

    fn body(&self, node: &str) -> Vec<u8> {
        body(self, node, Some(&self.room), None, None)
    }

    fn verdict(self, answer: Answer) -> Result<Verdict, HookError> {
        answer.result().map(|_| Verdict::Allow)
    }
}

impl ProxyEvent for MessageEvent {
    const NAME: &'static str = "publish";
    type Verdict = MessageVerdict;

    fn socket(&self) -> &SocketInfo {
        &self.socket
    }

    fn room(&self) -> Option<&str> {
        Some(&self.room)
    }

    fn unasked() -> MessageVerdict {
        MessageVerdict::Allow
    }

    fn body(&self, node: &str) -> Vec<u8> {
        body(self, node, Some(&self.room), Some(&self.payload), None)
    }

    fn verdict(self, answer: Answer) -> Result<MessageVerdict, HookError> {
        Ok(match answer.result()?.payload {
            Some(payload) => MessageVerdict::Replace(payload),
            None => MessageVerdict::Allow,
        })
    }
}

impl ProxyEvent for RefreshEvent {
    const NAME: &'static str = "refresh";
    type Verdict = RefreshVerdict;

    fn socket(&self) -> &SocketInfo {
        &self.socket
    }

    fn unasked() -> RefreshVerdict {
        RefreshVerdict::Grant(Grant::new())
    }

    fn body(&self, node: &str) -> Vec<u8> {
        body(self, node, None, None, Some(&self.token))
    }

    fn verdict(self, answer: Answer) -> Result<RefreshVerdict, HookError> {
        let mut grant = answer.result()?.grant()?;
        // A refresh without new meta keeps the socket's.
        if grant.values.get::<Meta>().is_none() {
            if let Some(meta) = self.socket.granted().get::<Meta>() {
                grant = grant.with(meta.clone());
            }
        }
        Ok(RefreshVerdict::Grant(grant))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_become_results_or_refusals() {
        let answer = Answer::parse(br#"{"result":{"identity":"alice","meta":{"plan":"pro"}}}"#);
        let grant = answer.unwrap().result().unwrap().grant().unwrap();
        assert_eq!(grant.identity.as_deref(), Some("alice"));
        assert_eq!(
            grant.values.get::<Meta>().unwrap().get().get(),
            r#"{"plan":"pro"}"#
        );

        let refused = Answer::parse(br#"{"error":{"code":"limit_exceeded","message":"full"}}"#);
        match refused.unwrap().result() {
            Err(HookError::Refused { code, message }) => {
                assert_eq!((code, message.as_str()), (ErrorCode::LimitExceeded, "full"))
            }
            other => panic!("{other:?}"),
        }
        let unknown = Answer::parse(br#"{"error":{"code":"nope"}}"#).unwrap();
        assert!(matches!(
            unknown.result(),
            Err(HookError::Refused {
                code: ErrorCode::Forbidden,
                ..
            })
        ));
        // Not the documented objects: arrays read by position, `null` for a field that
        // decides (`"identity": null` must not bind the identity the client claimed).
        for nonsense in [
            &b"<html>"[..],
            b"{}",
            b"[]",
            br#"[{}]"#,
            br#"[{"message":"x"}]"#,
            br#"{"result":[]}"#,
            br#"{"result":["mallory"]}"#,
            br#"{"result":null}"#,
            br#"{"error":["forbidden","no"]}"#,
            br#"{"result":{"identity":null}}"#,
            br#"{"result":{"expireAt":null}}"#,
            br#"{"result":{"rooms":null}}"#,
        ] {
            let failed = Answer::parse(nonsense).and_then(Answer::result);
            assert!(
                matches!(failed, Err(HookError::Unavailable(_))),
                "{nonsense:?}"
            );
        }
        let big = format!(r#"{{"result":{{"meta":"{}"}}}}"#, "x".repeat(5000));
        let grant = Answer::parse(big.as_bytes())
            .unwrap()
            .result()
            .unwrap()
            .grant();
        assert!(matches!(grant, Err(HookError::Unavailable(_))));
        // A deadline already past refuses; milliseconds by mistake, or an empty identity, is
        // the backend's failure.
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        for (answer, refused) in [
            (format!(r#"{{"result":{{"expireAt":{}}}}}"#, now - 10), true),
            (
                format!(r#"{{"result":{{"expireAt":{}}}}}"#, now * 1000),
                false,
            ),
            (r#"{"result":{"identity":""}}"#.to_owned(), false),
        ] {
            let grant = Answer::parse(answer.as_bytes())
                .unwrap()
                .result()
                .unwrap()
                .grant();
            match (grant, refused) {
                (Err(HookError::Refused { code, .. }), true) => {
                    assert_eq!(code, ErrorCode::Forbidden)
                }
                (Err(HookError::Unavailable(_)), false) => {}
                (other, _) => panic!("{answer}: {other:?}"),
            }
        }
        // A payload of `null` replaces; a missing one keeps the client's.
        let null = Answer::parse(br#"{"result":{"payload":null}}"#).unwrap();
        assert_eq!(null.result().unwrap().payload.unwrap().get(), "null");
    }
}

//! Signed connection tokens for the standalone server: with `--token-secret` (HS256) or
//! `--token-public-key` (RS256 or ES256, a PEM file), every socket must `connect` with a JWT
//! (in the frame's `token` field or as `?token=` on the upgrade URL). Its `sub` claim is the
//! socket's identity, `exp` is required (and `nbf` honoured), and an optional `rooms` claim
//! lists the rooms the socket may subscribe and publish to (an exact name, or a prefix
//! ending in `*`; absent: every room). A socket without a valid token gets `forbidden` on
//! every operation and is closed with 1008 after a grace period; a socket whose token
//! expires is closed with 1008 ("token expired") unless it sent `refresh` with a new token
//! for the same `sub` first.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Deserializer};
use thinws::hooks::{
    ConnectEvent, ConnectVerdict, Grant, MessageEvent, MessageVerdict, RefreshEvent,
    RefreshVerdict, SocketInfo, SubscribeEvent, UnsubscribeEvent, Verdict,
};
use thinws::ThinWsBuilder;
use tower::service_fn;

/// Seconds of clock difference allowed when checking `exp` and `nbf`; a socket is closed
/// this long after its token's `exp`.
pub const LEEWAY_SECONDS: u64 = 5;

/// The shortest HS256 secret accepted (RFC 7518 §3.2: a key at least as long as the hash).
pub const MIN_SECRET_BYTES: usize = 32;

/// How token signatures and claims are checked.
#[derive(Clone)]
pub struct Auth {
    key: Arc<DecodingKey>,
    validation: Arc<Validation>,
}

/// The claims thinws reads (`exp`, `nbf`, `iss` and `aud` are checked by the validation).
#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    /// Absent: every room; a list: those rooms; `null` or anything else: refused.
    #[serde(default, deserialize_with = "present")]
    rooms: Option<Option<Vec<String>>>,
}

/// Tells a `rooms` claim that is `null` (`Some(None)`) from a missing one (`None`).
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<Vec<String>>>, D::Error> {
    Option::<Vec<String>>::deserialize(d).map(Some)
}

/// What one socket's token allows: kept by the socket with its grant, so it lives and dies
/// with it and changes only when a `connect` or `refresh` succeeds.
#[derive(Debug, Clone)]
struct Rooms {
    /// `None`: every room.
    patterns: Option<Arc<[String]>>,
}

impl Rooms {
    fn allows(&self, room: &str) -> bool {
        self.patterns.as_ref().is_none_or(|patterns| {
            patterns
                .iter()
                .any(|pattern| match pattern.strip_suffix('*') {
                    Some(prefix) => room.starts_with(prefix),
                    None => pattern == room,
                })
        })
    }
}

/// What a valid token says.
struct Verified {
    identity: String,
    rooms: Rooms,
    /// When the socket is closed unless it refreshes: `exp` plus the leeway.
    deadline: SystemTime,
}

impl Verified {
    fn grant(self) -> Grant {
        Grant::new()
            .identity(self.identity)
            .with(self.rooms)
            .expires_at(self.deadline)
    }
}

/// Which issuer and audience tokens must name, if any.
#[derive(Debug, Clone, Default)]
pub struct Expected {
    /// `iss` must be this.
    pub issuer: Option<String>,
    /// `aud` must contain this.
    pub audience: Option<String>,
}

impl Auth {
    /// HS256 tokens signed with `secret` (at least [`MIN_SECRET_BYTES`] long).
    pub fn from_secret(secret: &[u8], expected: &Expected) -> Result<Self, String> {
        if secret.len() < MIN_SECRET_BYTES {
            return Err(format!(
                "the token secret is {} bytes: an HS256 secret must be at least {MIN_SECRET_BYTES} bytes (e.g. `openssl rand -hex 32`)",
                secret.len()
            ));
        }
        Ok(Self::new(
            DecodingKey::from_secret(secret),
            &[Algorithm::HS256],
            expected,
        ))
    }

    /// RS256 or ES256 tokens, checked with the public key in `pem`.
    pub fn from_public_key(pem: &[u8], expected: &Expected) -> Result<Self, String> {
        if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
            return Ok(Self::new(key, &[Algorithm::RS256], expected));
        }
        DecodingKey::from_ec_pem(pem)
            .map(|key| Self::new(key, &[Algorithm::ES256], expected))
            .map_err(|e| format!("not an RSA or EC public key in PEM: {e}"))
    }

    fn new(key: DecodingKey, algorithms: &[Algorithm], expected: &Expected) -> Self {
        let mut validation = Validation::new(algorithms[0]);
        validation.algorithms = algorithms.to_vec();
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.validate_nbf = true;
        // A few seconds for clocks that differ.
        validation.leeway = LEEWAY_SECONDS;
        // Without an expected audience, a token that names one is refused (it was meant
        // for another service).
        if let Some(audience) = &expected.audience {
            validation.set_audience(&[audience]);
        }
        if let Some(issuer) = &expected.issuer {
            validation.set_issuer(&[issuer]);
        }
        Auth {
            key: Arc::new(key),
            validation: Arc::new(validation),
        }
    }

    /// Checks a token: what it grants, or why not.
    fn verify(&self, token: &str) -> Result<Verified, String> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| format!("invalid token: {e}"))?;
        let claims = data.claims;
        if claims.sub.is_empty() {
            return Err("invalid token: empty sub".into());
        }
        let patterns = match claims.rooms {
            None => None,
            Some(Some(rooms)) => Some(rooms.into()),
            Some(None) => return Err("invalid token: rooms must be a list of rooms".into()),
        };
        let deadline = UNIX_EPOCH
            .checked_add(Duration::from_secs(
                claims.exp.saturating_add(LEEWAY_SECONDS),
            ))
            .ok_or("invalid token: exp out of range")?;
        Ok(Verified {
            identity: claims.sub,
            rooms: Rooms { patterns },
            deadline,
        })
    }

    /// Whether the socket is bound with a token that allows `room`.
    fn check(socket: &SocketInfo, room: &str) -> Verdict {
        match socket.granted().get::<Rooms>() {
            None => Verdict::refuse("connect with a valid token first"),
            Some(rooms) if !rooms.allows(room) => {
                Verdict::refuse("the token does not allow this room")
            }
            Some(_) => Verdict::Allow,
        }
    }

    /// Sets the hooks that enforce tokens, and closes sockets that have not connected with
    /// one within `grace`. A socket is closed (1008) when its token expires, unless it sent
    /// `refresh` with a new one for the same `sub`.
    pub fn apply(self, builder: ThinWsBuilder, grace: Duration) -> ThinWsBuilder {
        let connect = self.clone();
        let refresh = self;
        builder
            .require_connect_within(grace)
            .on_connect(service_fn(move |event: ConnectEvent| {
                let token = event
                    .token()
                    .map(str::to_owned)
                    .or_else(|| token_in_query(event.socket().request().uri.query().unwrap_or("")));
                let verdict = match token {
                    None => ConnectVerdict::refuse("a token is required"),
                    Some(token) => match connect.verify(&token) {
                        Ok(verified) => ConnectVerdict::Grant(verified.grant()),
                        Err(reason) => ConnectVerdict::Refuse(reason),
                    },
                };
                async move { Ok::<_, Infallible>(verdict) }
            }))
            .on_refresh(service_fn(move |event: RefreshEvent| {
                // A token for another `sub` is refused by thinws itself (a socket never
                // changes identity).
                let verdict = match refresh.verify(event.token()) {
                    Ok(verified) => RefreshVerdict::Grant(verified.grant()),
                    Err(reason) => RefreshVerdict::Refuse(reason),
                };
                async move { Ok::<_, Infallible>(verdict) }
            }))
            .on_subscribe(service_fn(move |event: SubscribeEvent| {
                let verdict = Auth::check(event.socket(), event.room());
                async move { Ok::<_, Infallible>(verdict) }
            }))
            .on_unsubscribe(service_fn(move |event: UnsubscribeEvent| {
                let verdict = match event.socket().granted().get::<Rooms>() {
                    Some(_) => Verdict::Allow,
                    None => Verdict::refuse("connect with a valid token first"),
                };
                async move { Ok::<_, Infallible>(verdict) }
            }))
            .on_message(service_fn(move |event: MessageEvent| {
                let verdict = match Auth::check(event.socket(), event.room()) {
                    Verdict::Allow => MessageVerdict::Allow,
                    Verdict::Refuse(reason) => MessageVerdict::Refuse(reason),
                };
                async move { Ok::<_, Infallible>(verdict) }
            }))
    }
}

/// The `token` parameter of a query string.
fn token_in_query(query: &str) -> Option<String> {
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix("token="))
        .filter(|token| !token.is_empty())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_patterns_are_exact_names_or_prefixes() {
        let rooms = Rooms {
            patterns: Some(vec!["chat:*".to_owned(), "news".to_owned()].into()),
        };
        assert!(rooms.allows("chat:lobby") && rooms.allows("chat:") && rooms.allows("news"));
        assert!(!rooms.allows("newsroom") && !rooms.allows("chat") && !rooms.allows("admin"));
        assert!(Rooms { patterns: None }.allows("anything"));
    }

    #[test]
    fn the_token_is_read_from_the_query() {
        assert_eq!(token_in_query("a=1&token=x.y.z"), Some("x.y.z".into()));
        assert_eq!(token_in_query("token="), None);
        assert_eq!(token_in_query("tokens=1"), None);
    }
}

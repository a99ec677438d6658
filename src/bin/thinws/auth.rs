//! Signed connection tokens for the standalone server: with `--token-secret` (HS256) or
//! `--token-public-key` (RS256 or ES256, a PEM file), every socket must `connect` with a JWT
//! (in the frame's `token` field or as `?token=` on the upgrade URL). Its `sub` claim is the
//! socket's identity, `exp` is required, and an optional `rooms` claim lists the rooms the
//! socket may subscribe and publish to (an exact name, or a prefix ending in `*`). A socket
//! without a valid token gets `forbidden` on every operation and is closed with 1008 after
//! a grace period.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use thinws::hooks::{
    ConnectEvent, ConnectVerdict, DisconnectEvent, MessageEvent, MessageVerdict, SocketInfo,
    SubscribeEvent, UnsubscribeEvent, Verdict,
};
use thinws::ThinWsBuilder;
use tower::service_fn;

/// How token signatures are checked.
#[derive(Clone)]
pub struct Auth {
    key: Arc<DecodingKey>,
    validation: Arc<Validation>,
    /// What each bound socket's token allows, by socket id.
    grants: Arc<Mutex<HashMap<u64, Grant>>>,
}

/// The claims thinws reads.
#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    rooms: Option<Vec<String>>,
}

/// What one socket's token allows.
#[derive(Debug, Clone)]
struct Grant {
    /// `None`: every room.
    rooms: Option<Vec<String>>,
}

impl Grant {
    fn allows(&self, room: &str) -> bool {
        self.rooms.as_ref().is_none_or(|patterns| {
            patterns
                .iter()
                .any(|pattern| match pattern.strip_suffix('*') {
                    Some(prefix) => room.starts_with(prefix),
                    None => pattern == room,
                })
        })
    }
}

impl Auth {
    /// HS256 tokens signed with `secret`.
    pub fn from_secret(secret: &str) -> Self {
        Self::new(
            DecodingKey::from_secret(secret.as_bytes()),
            &[Algorithm::HS256],
        )
    }

    /// RS256 or ES256 tokens, checked with the public key in `pem`.
    pub fn from_public_key(pem: &[u8]) -> Result<Self, String> {
        if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
            return Ok(Self::new(key, &[Algorithm::RS256]));
        }
        DecodingKey::from_ec_pem(pem)
            .map(|key| Self::new(key, &[Algorithm::ES256]))
            .map_err(|e| format!("not an RSA or EC public key in PEM: {e}"))
    }

    fn new(key: DecodingKey, algorithms: &[Algorithm]) -> Self {
        let mut validation = Validation::new(algorithms[0]);
        validation.algorithms = algorithms.to_vec();
        validation.set_required_spec_claims(&["exp", "sub"]);
        // A few seconds for clocks that differ; `exp` is honoured.
        validation.leeway = 5;
        Auth {
            key: Arc::new(key),
            validation: Arc::new(validation),
            grants: Arc::default(),
        }
    }

    fn grants(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Grant>> {
        self.grants.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Checks a token; the identity and grant it carries, or why not.
    fn verify(&self, token: &str) -> Result<(String, Grant), String> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| format!("invalid token: {e}"))?;
        if data.claims.sub.is_empty() {
            return Err("invalid token: empty sub".into());
        }
        Ok((
            data.claims.sub,
            Grant {
                rooms: data.claims.rooms,
            },
        ))
    }

    /// Whether the socket is bound with a token that allows `room`.
    fn check(&self, socket: &SocketInfo, room: &str) -> Verdict {
        if !socket.has_bound_identity() {
            return Verdict::refuse("connect with a valid token first");
        }
        match self.grants().get(&socket.id()) {
            None => Verdict::refuse("connect with a valid token first"),
            Some(grant) if !grant.allows(room) => {
                Verdict::refuse("the token does not allow this room")
            }
            Some(_) => Verdict::Allow,
        }
    }

    /// Sets the hooks that enforce tokens, and closes sockets that have not connected with
    /// one within `grace`.
    pub fn apply(self, builder: ThinWsBuilder, grace: Duration) -> ThinWsBuilder {
        let connect = self.clone();
        let subscribe = self.clone();
        let message = self.clone();
        let disconnect = self;
        builder
            .require_connect_within(grace)
            .on_connect(service_fn(move |event: ConnectEvent| {
                let auth = connect.clone();
                async move {
                    let token = event.token().map(str::to_owned).or_else(|| {
                        token_in_query(event.socket().request().uri.query().unwrap_or(""))
                    });
                    let Some(token) = token else {
                        return Ok::<_, Infallible>(ConnectVerdict::refuse("a token is required"));
                    };
                    Ok(match auth.verify(&token) {
                        Ok((identity, grant)) => {
                            auth.grants().insert(event.socket().id(), grant);
                            ConnectVerdict::Assign(identity)
                        }
                        Err(reason) => ConnectVerdict::Refuse(reason),
                    })
                }
            }))
            .on_subscribe(service_fn(move |event: SubscribeEvent| {
                let verdict = subscribe.check(event.socket(), event.room());
                async move { Ok::<_, Infallible>(verdict) }
            }))
            .on_unsubscribe(service_fn(move |event: UnsubscribeEvent| {
                let verdict = match event.socket().has_bound_identity() {
                    true => Verdict::Allow,
                    false => Verdict::refuse("connect with a valid token first"),
                };
                async move { Ok::<_, Infallible>(verdict) }
            }))
            .on_message(service_fn(move |event: MessageEvent| {
                let verdict = match message.check(event.socket(), event.room()) {
                    Verdict::Allow => MessageVerdict::Allow,
                    Verdict::Refuse(reason) => MessageVerdict::Refuse(reason),
                };
                async move { Ok::<_, Infallible>(verdict) }
            }))
            .on_disconnect(service_fn(move |event: DisconnectEvent| {
                disconnect.grants().remove(&event.socket().id());
                async move { Ok::<_, Infallible>(()) }
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
        let grant = Grant {
            rooms: Some(vec!["chat:*".into(), "news".into()]),
        };
        assert!(grant.allows("chat:lobby") && grant.allows("chat:") && grant.allows("news"));
        assert!(!grant.allows("newsroom") && !grant.allows("chat") && !grant.allows("admin"));
        assert!(Grant { rooms: None }.allows("anything"));
    }

    #[test]
    fn the_token_is_read_from_the_query() {
        assert_eq!(token_in_query("a=1&token=x.y.z"), Some("x.y.z".into()));
        assert_eq!(token_in_query("token="), None);
        assert_eq!(token_in_query("tokens=1"), None);
    }
}

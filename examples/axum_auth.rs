//! Authentication composed the tower way: a bearer-token layer *outside* `ThinWsLayer`
//! refuses upgrades without a valid token (401, before any socket exists) and puts the
//! verified user in the request extensions; thinws hooks read it there, bind the socket to
//! that user and let it join only its own rooms.
//!
//! Browsers cannot set headers on a WebSocket, so the token is also accepted as
//! `?access_token=...`.
//!
//! ```sh
//! cargo run --example axum_auth
//! # then open ws://127.0.0.1:3001/?access_token=alice-token
//! ```

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use thinws::hooks::{ConnectEvent, ConnectVerdict, SubscribeEvent, Verdict};
use thinws::ThinWsLayer;
use tower::service_fn;

/// A verified user, as the auth layer leaves it in the request extensions.
#[derive(Clone, Debug)]
pub struct User {
    pub name: String,
    pub rooms: Vec<String>,
}

/// Token → user. A real application would verify a JWT or ask a session store.
pub type Users = Arc<HashMap<String, User>>;

pub fn demo_users() -> Users {
    let user = |name: &str, rooms: &[&str]| User {
        name: name.into(),
        rooms: rooms.iter().map(|r| r.to_string()).collect(),
    };
    Arc::new(HashMap::from([
        (
            "alice-token".into(),
            user("alice", &["general", "alice-private"]),
        ),
        ("bob-token".into(), user("bob", &["general"])),
    ]))
}

fn token(request: &Request) -> Option<&str> {
    let from_header = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let from_query = || {
        request
            .uri()
            .query()?
            .split('&')
            .find_map(|pair| pair.strip_prefix("access_token="))
    };
    from_header.or_else(from_query)
}

/// The bearer-token middleware: 401 without a known token, else the user goes into the
/// request extensions.
async fn require_bearer(State(users): State<Users>, mut request: Request, next: Next) -> Response {
    let user = token(&request).and_then(|t| users.get(t)).cloned();
    match user {
        Some(user) => {
            request.extensions_mut().insert(user);
            next.run(request).await
        }
        None => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "missing or unknown bearer token\n",
        )
            .into_response(),
    }
}

/// The ThinWS layer with hooks that trust only what the auth layer verified.
pub fn thinws_layer(builder: thinws::ThinWsBuilder) -> ThinWsLayer {
    builder
        .on_connect(service_fn(|event: ConnectEvent| async move {
            Ok::<_, Infallible>(match event.socket().extensions().get::<User>() {
                // Whatever connectionID the client claims, it is this user.
                Some(user) => ConnectVerdict::Assign(user.name.clone()),
                None => ConnectVerdict::refuse("not authenticated"),
            })
        }))
        .on_subscribe(service_fn(|event: SubscribeEvent| async move {
            let user = event.socket().extensions().get::<User>();
            Ok::<_, Infallible>(match user {
                Some(user) if user.rooms.iter().any(|r| r == event.room()) => Verdict::Allow,
                Some(user) => {
                    Verdict::refuse(format!("{} may not join {}", user.name, event.room()))
                }
                None => Verdict::refuse("not authenticated"),
            })
        }))
        .build()
}

pub fn app(users: Users, layer: ThinWsLayer) -> Router {
    Router::new()
        .route("/", get(|| async { "authenticated thinws" }))
        .layer(layer)
        // Added last, so it runs first: outside ThinWsLayer.
        .layer(middleware::from_fn_with_state(users, require_bearer))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let builder = match std::env::var("REDIS_URL") {
        Ok(url) => ThinWsLayer::builder().redis_url(url),
        Err(_) => ThinWsLayer::builder(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3001").await?;
    println!("open ws://127.0.0.1:3001/?access_token=alice-token (or bob-token)");
    axum::serve(listener, app(demo_users(), thinws_layer(builder))).await?;
    Ok(())
}

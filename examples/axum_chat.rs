//! The README's quick start: an axum app whose every path also takes ThinWS sockets, with
//! an HTTP endpoint that publishes to a room from a handler, and one that lists who is in a
//! room (its presence, across every node).
//!
//! ```sh
//! cargo run --example axum_chat                                  # one node, in memory
//! REDIS_URL=redis://127.0.0.1:6379 cargo run --example axum_chat # fan out through Redis
//! curl -X POST localhost:3000/rooms/lobby/messages -H 'content-type: application/json' -d '{"text":"hi"}'
//! curl localhost:3000/rooms/lobby/members
//! ```

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use thinws::settings::Presence;
use thinws::{Hub, ThinWsBuilder, ThinWsLayer};

/// The layer's settings: every room tracks presence and announces joins and leaves.
pub fn settings() -> ThinWsBuilder {
    ThinWsLayer::builder().presence(Presence::WithJoinLeave)
}

/// The application: routes, plus the ThinWS layer around them.
pub fn app(layer: ThinWsLayer) -> Router {
    Router::new()
        .route(
            "/",
            get(|| async { "thinws chat: open a WebSocket on this URL" }),
        )
        .route("/rooms/{room}/messages", post(publish))
        .route("/rooms/{room}/members", get(members))
        .with_state(layer.hub())
        .layer(layer)
}

/// `POST /rooms/{room}/messages` with a JSON body: delivered to the room's subscribers on
/// every node, as if a client had sent it.
async fn publish(
    State(hub): State<Hub>,
    Path(room): Path<String>,
    Json(payload): Json<Value>,
) -> Result<StatusCode, (StatusCode, String)> {
    match hub.publish(&room, &payload).await {
        Ok(()) => Ok(StatusCode::ACCEPTED),
        Err(e) => Err((StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
    }
}

/// `GET /rooms/{room}/members`: who is in the room, on every node.
async fn members(
    State(hub): State<Hub>,
    Path(room): Path<String>,
) -> Result<Json<Value>, (StatusCode, String)> {
    match hub.presence(&room).await {
        Ok(Some(presence)) => Ok(Json(
            json!({"count": presence.count, "members": presence.members}),
        )),
        Ok(None) => Err((StatusCode::NOT_FOUND, "no presence in this room".into())),
        Err(e) => Err((StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let layer = match std::env::var("REDIS_URL") {
        Ok(url) => settings().redis_url(url).connect().await?,
        Err(_) => settings().build(),
    };
    let addr = std::env::var("LISTEN").unwrap_or_else(|_| "127.0.0.1:3000".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("chat on ws://{addr}/ ; POST http://{addr}/rooms/{{room}}/messages to publish");
    axum::serve(listener, app(layer)).await?;
    Ok(())
}

//! Opening the client's connection: the WebSocket (over rustls for `wss://`), then
//! `connect` with the identity, its token and its history positions.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::value::RawValue;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::held::Held;
use super::{ClientBuilder, ClientError};
use crate::protocol::server::{self, ServerFrame};
use crate::protocol::ErrorCode;

/// The client's WebSocket.
pub(super) type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The request number a server frame answers, if it is one of ours.
pub(super) fn answered(message_id: Option<&RawValue>) -> Option<u64> {
    message_id.and_then(|id| id.get().parse().ok())
}

/// What an `error` frame means for the request it answers.
pub(super) fn server_error(code: &str, message: &str) -> ClientError {
    match code.parse::<ErrorCode>() {
        Ok(code) => ClientError::Server {
            code,
            message: message.to_owned(),
        },
        Err(unknown) => ClientError::Protocol(format!("{unknown}: {message}")),
    }
}

/// Opens the WebSocket: for `wss://`, over rustls with the system's roots and the
/// configured CA.
async fn connect(
    config: &ClientBuilder,
    url: &str,
) -> Result<
    (
        Socket,
        tokio_tungstenite::tungstenite::handshake::client::Response,
    ),
    tokio_tungstenite::tungstenite::Error,
> {
    #[cfg(feature = "tls")]
    if url.starts_with("wss://") {
        let tls = crate::tls::client_config(config.tls_ca_pem.as_deref()).map_err(|e| {
            // The reason is in the source chain, which the socket error's Display drops.
            let report = crate::error::report(&e);
            tokio_tungstenite::tungstenite::Error::Io(std::io::Error::other(report))
        })?;
        let connector = tokio_tungstenite::Connector::Rustls(tls);
        return tokio_tungstenite::connect_async_tls_with_config(url, None, false, Some(connector))
            .await;
    }
    let _ = config;
    tokio_tungstenite::connect_async(url).await
}

/// An open socket bound to the identity.
pub(super) struct Opened {
    pub(super) socket: Socket,
    /// How long its credential lasts, if the server said.
    pub(super) expires_in: Option<Duration>,
    /// Rooms the client holds that the server did not rejoin: subscribed again first.
    pub(super) missing: Vec<String>,
    /// Frames that came before the `connect` ack (deliveries in the rooms rejoined so far,
    /// gaps, presence events), to be handled first, in order.
    pub(super) early: Vec<String>,
}

/// The most frames kept from before the `connect` ack; past it, the rooms of those left
/// out are told a gap.
const MAX_EARLY: usize = 4096;

/// Opens a socket and binds it to the identity; the server has rejoined the identity's
/// rooms when this returns.
pub(super) async fn open(
    config: &ClientBuilder,
    url: &str,
    held: &mut Held,
) -> Result<Opened, ClientError> {
    let connect = async {
        let token = match &config.token {
            None => None,
            Some(source) => Some(source.get().await?),
        };
        let lost = |e| ClientError::Connect(std::sync::Arc::new(e));
        let (mut socket, _) = connect(config, url).await.map_err(lost)?;
        // Where each history room ends here, so that the server sends what followed.
        let frame = held.connect_frame(&config.connection_id, token.as_deref());
        let length = frame.len();
        socket.send(Message::text(frame)).await.map_err(lost)?;
        let mut early = Vec::new();
        let mut overflowed = std::collections::BTreeSet::new();
        while let Some(message) = socket.next().await {
            let text = match message.map_err(lost)? {
                Message::Text(text) => text,
                // Too large with its positions: the next one goes without them.
                Message::Close(Some(close)) if close.code == CloseCode::Size => {
                    held.connect_too_large(length);
                    continue;
                }
                _ => continue,
            };
            match server::parse(&text) {
                Ok(ServerFrame::Ack {
                    message_id,
                    rooms,
                    expires_in,
                    ..
                }) if answered(Some(message_id)) == Some(0) => {
                    let missing = held.rejoined(rooms, |gap| config.gap(gap));
                    for room in overflowed {
                        config.gap(super::Gap {
                            room,
                            offset: None,
                            epoch: None,
                        });
                    }
                    return Ok(Opened {
                        socket,
                        expires_in: expires_in.map(Duration::from_secs),
                        missing,
                        early,
                    });
                }
                Ok(ServerFrame::Error {
                    message_id,
                    code,
                    message,
                }) if answered(message_id) == Some(0) => return Err(server_error(&code, &message)),
                // Rooms are joined as the server rejoins them, before it acks: what they
                // carry meanwhile is kept for the session (a gap told at once must not be
                // lost). Past the bound, each room left out is told a gap.
                Ok(ServerFrame::Message { room, .. } | ServerFrame::Gap { room, .. })
                    if early.len() >= MAX_EARLY =>
                {
                    overflowed.insert(room.into_owned());
                }
                Ok(_) if early.len() < MAX_EARLY => early.push(text.as_str().to_owned()),
                _ => continue,
            }
        }
        Err(ClientError::Disconnected)
    };
    tokio::time::timeout(config.request_timeout, connect)
        .await
        .unwrap_or(Err(ClientError::Timeout))
}

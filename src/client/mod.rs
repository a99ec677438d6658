//! The Rust client (cargo feature `client`).
//!
//! [`ThinWsClient::connect`] opens a socket, binds it to a `connectionID` and returns a
//! cloneable client and the [`Messages`] stream of deliveries. `subscribe`, `unsubscribe`
//! and `send` resolve when the server acks, or fail with the server's `error` (typed:
//! [`ClientError::Server`]), a timeout, or a lost connection.
//!
//! When the connection drops (the server restarts, closes the socket, or the network
//! fails), the client reconnects on its own with exponential backoff and jitter, and
//! sends `connect` again, so the server rejoins every room the identity subscribed to.
//! While it is disconnected:
//! - new requests are **queued** (up to [`ClientBuilder::max_queued`], default 1,024; beyond
//!   that they fail at once with [`ClientError::QueueFull`]) and sent after reconnecting,
//!   each still bounded by the request timeout;
//! - messages ([`ThinWsClient::send`]) that were sent but not acked are sent again after
//!   reconnecting (to any node), in the order they were first sent, before anything new;
//! - other requests that were already sent fail with [`ClientError::Disconnected`]: the
//!   server may or may not have applied them.
//!
//! **Messages are published exactly once.** Each carries an idempotency key (protocol
//! 1.2), so the server publishes a message sent again at most once within its window (2
//! minutes by default). A message answered `timeout` (the outcome is unknown) or
//! `unavailable` (nothing was published) is sent again with its key after a pause (100 ms,
//! doubling up to 2 s while Redis stays away); `send` resolves once the message is
//! published, and fails only on a definite error (`forbidden`, `invalid_*`, `too_large`,
//! `rate_limited`: nothing was published), a full queue ([`ClientError::QueueFull`]), or its
//! deadline ([`ClientBuilder::request_timeout`]; [`ClientError::Timeout`]: the outcome is
//! unknown, and the message is not sent again). A message refused when sent again, after a
//! send of it that may have been published, fails with [`ClientError::Unsettled`]: the
//! outcome is unknown (a hook or a rate limit may refuse the resend of a message the broker
//! had published). Order: messages reach subscribers in the
//! order of the `send` calls that each resolved before the next was made; messages sent
//! concurrently keep their order too unless one of them has to be sent again. Other
//! requests' errors from the server are returned as they are, never retried.
//!
//! `wss://` needs the `tls` feature too (rustls, trusting the system's roots and, with
//! [`ClientBuilder::tls_ca_pem`], a private CA).
//!
//! # Example
//!
//! ```no_run
//! use futures_util::StreamExt;
//! use thinws::client::ThinWsClient;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), thinws::client::ClientError> {
//! let (client, mut messages) = ThinWsClient::connect("ws://127.0.0.1:8080/", "alice").await?;
//! client.subscribe("lobby").await?;
//! client.send("lobby", &serde_json::json!({"text": "hi"})).await?;
//! while let Some(message) = messages.next().await {
//!     println!("{:?} in {}: {}", message.sender, message.room, message.payload);
//! }
//! # Ok(())
//! # }
//! ```

mod driver;
mod events;
mod held;
mod history;
mod incoming;
mod open;
mod outbox;
mod renewal;

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

pub use self::events::{Delivery, Gap, HistoryPage, Member, Messages};
use self::events::{OnGap, OnPresence};
use crate::protocol::ErrorCode;
use crate::RoomPresence;

/// Why a client operation failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The server refused the operation with an `error` frame.
    #[error("server error {code}: {message}")]
    Server {
        /// The protocol's error code, e.g. [`ErrorCode::Forbidden`].
        code: ErrorCode,
        /// The server's explanation.
        message: String,
    },
    /// The server answered with a frame this client cannot read (e.g. an error code newer
    /// than this client); the operation's outcome is unknown.
    #[error("unreadable answer from the server: {0}")]
    Protocol(String),
    /// No answer within the request timeout.
    #[error("no answer from the server in time")]
    Timeout,
    /// A message sent again (after `timeout` or a lost connection) was refused this time,
    /// and an earlier send of it may have been published: the outcome is unknown.
    #[error("the message was refused when sent again ({message}); an earlier send may have been published")]
    Unsettled {
        /// The refusal's code, if this client knows it.
        code: Option<ErrorCode>,
        /// The server's explanation.
        message: String,
    },
    /// The connection dropped after the request was sent; it may or may not have been
    /// applied.
    #[error("the connection dropped before the server answered")]
    Disconnected,
    /// Too many requests are waiting for the connection to come back.
    #[error("too many requests queued while disconnected")]
    QueueFull,
    /// The client was closed.
    #[error("the client is closed")]
    Closed,
    /// The first connection could not be opened (a refused `connect` is
    /// [`ClientError::Server`] instead).
    #[error("cannot connect")]
    Connect(#[source] Arc<tokio_tungstenite::tungstenite::Error>),
    /// The payload could not be serialised to JSON.
    #[error("payload is not serialisable to JSON")]
    InvalidPayload(#[source] Arc<serde_json::Error>),
    /// The token provider failed.
    #[error("cannot get a token")]
    Token(#[source] Arc<dyn std::error::Error + Send + Sync>),
}

impl ClientError {
    /// The server's error code, for [`ClientError::Server`].
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// One operation for the server.
#[derive(Debug)]
pub(crate) enum Op {
    Subscribe(String),
    Unsubscribe(String),
    Message(outbox::Outgoing),
    /// A room, a limit, and `before` (the next page back).
    History(String, Option<u64>, Option<u64>),
    Presence(String),
}

/// Where the driver answers a request: the ack's text, or the error.
pub(crate) type Reply = oneshot::Sender<Result<String, ClientError>>;

pub(crate) enum Request {
    Op { op: Op, reply: Reply },
    Close(oneshot::Sender<()>),
}

/// A future of a fresh token (see [`ClientBuilder::token_provider`]).
pub type TokenFuture =
    Pin<Box<dyn Future<Output = Result<String, Box<dyn std::error::Error + Send + Sync>>> + Send>>;

/// Where the client's `connect` token comes from.
#[derive(Clone)]
pub(crate) enum TokenSource {
    Fixed(String),
    Provider(Arc<dyn Fn() -> TokenFuture + Send + Sync>),
}

impl TokenSource {
    pub(crate) async fn get(&self) -> Result<String, ClientError> {
        match self {
            TokenSource::Fixed(token) => Ok(token.clone()),
            TokenSource::Provider(provider) => provider()
                .await
                .map_err(|e| ClientError::Token(Arc::from(e))),
        }
    }
}

impl fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print a credential.
        f.write_str(match self {
            TokenSource::Fixed(_) => "Fixed(***)",
            TokenSource::Provider(_) => "Provider",
        })
    }
}

/// Settings of a [`ThinWsClient`].
#[derive(Debug, Clone)]
#[must_use]
pub struct ClientBuilder {
    pub(crate) url: String,
    /// More nodes to reconnect to, in turn with `url`.
    pub(crate) more_urls: Vec<String>,
    pub(crate) connection_id: String,
    pub(crate) token: Option<TokenSource>,
    pub(crate) on_gap: Option<OnGap>,
    pub(crate) on_presence: OnPresence,
    pub(crate) request_timeout: Duration,
    /// For `wss://` (feature `tls`): a private CA to trust beside the system's roots.
    pub(crate) tls_ca_pem: Option<Arc<[u8]>>,
    pub(crate) max_queued: usize,
    pub(crate) max_backoff: Duration,
    pub(crate) keepalive: Duration,
}

impl ClientBuilder {
    /// How long an operation may wait for its ack (including time queued while
    /// disconnected). Default 10 s. A message is sent again with its key until then, so
    /// keep it under the rooms' idempotency window (2 minutes by default): a resend after
    /// the window could be published twice.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// How long the server may stay silent before the client pings it; a connection that
    /// does not answer the ping within as long again, or that takes this long to take a
    /// frame, is taken for dead (a NAT that forgot it, a peer gone without a FIN) and the
    /// client reconnects. Default 20 s (the server pings every 25 s by default).
    pub fn keepalive(mut self, silence: Duration) -> Self {
        self.keepalive = silence.max(Duration::from_millis(1));
        self
    }

    /// How many requests may wait for a connection while disconnected. Default 1,024.
    pub fn max_queued(mut self, requests: usize) -> Self {
        self.max_queued = requests;
        self
    }

    /// The longest pause between reconnection attempts (the backoff starts at 100 ms and
    /// doubles, with jitter). Default 10 s.
    pub fn max_backoff(mut self, max: Duration) -> Self {
        self.max_backoff = max;
        self
    }

    /// Other nodes of the same cluster: when the connection drops, the client reconnects to
    /// the next node in turn (the first URL, then these), so that a node that died does not
    /// keep it waiting. Behind a load balancer, one URL is enough.
    pub fn fallback_urls(mut self, urls: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.more_urls = urls.into_iter().map(Into::into).collect();
        self
    }

    /// The URL of the `n`th connection attempt, in turn.
    pub(crate) fn url_for(&self, n: usize) -> &str {
        match n % (self.more_urls.len() + 1) {
            0 => &self.url,
            i => &self.more_urls[i - 1],
        }
    }

    /// Sends `token` with every `connect` (e.g. a JWT for the standalone server's
    /// `--token-secret`). It can also go in the URL as `?token=`.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(TokenSource::Fixed(token.into()));
        self
    }

    /// Asks `provider` for a fresh token before every connection (the first and each
    /// reconnection), for tokens that expire; and, when the server says how long the
    /// socket's token lasts (`expiresIn`), again at three quarters of that time, sending it
    /// in a `refresh` so that the socket is not closed.
    ///
    /// ```no_run
    /// # async fn fetch_token_from_my_backend() -> Result<String, std::io::Error> { Ok(String::new()) }
    /// # async fn run() -> Result<(), thinws::client::ClientError> {
    /// let (client, messages) = thinws::client::ThinWsClient::builder("ws://127.0.0.1:8080/", "alice")
    ///     .token_provider(|| Box::pin(async { Ok(fetch_token_from_my_backend().await?) }))
    ///     .connect()
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn token_provider(
        mut self,
        provider: impl Fn() -> TokenFuture + Send + Sync + 'static,
    ) -> Self {
        self.token = Some(TokenSource::Provider(Arc::new(provider)));
        self
    }

    /// Called when messages of a room may have been missed (see [`Gap`]): in a history
    /// room, those the server could not send; in a room without history, after every
    /// reconnection (what was published meanwhile is gone) and whenever the node's pub/sub
    /// connection was lost. Messages of history rooms are otherwise recovered on every
    /// reconnection: the client remembers the last offset of each and sends it with
    /// `connect`, and drops any message it already had.
    pub fn on_gap(mut self, callback: impl Fn(Gap) + Send + Sync + 'static) -> Self {
        self.on_gap = Some(OnGap(Arc::new(callback)));
        self
    }

    /// For `wss://` URLs (feature `tls`): a private CA (PEM) to trust beside the system's
    /// root certificates, e.g. for a self-signed proxy certificate in a test setup.
    pub fn tls_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls_ca_pem = Some(pem.into().into());
        self
    }

    /// Called when an identity's first socket joins a room this client is in, on any node
    /// (in rooms with join/leave events on the server).
    pub fn on_join(mut self, callback: impl Fn(Member) + Send + Sync + 'static) -> Self {
        self.on_presence.join = Some(Arc::new(callback));
        self
    }

    /// Called when an identity's last socket leaves a room this client is in, or its node
    /// died (in rooms with join/leave events on the server).
    pub fn on_leave(mut self, callback: impl Fn(Member) + Send + Sync + 'static) -> Self {
        self.on_presence.leave = Some(Arc::new(callback));
        self
    }

    pub(crate) fn presence_event(&self, joined: bool, member: Member) {
        let callback = match joined {
            true => &self.on_presence.join,
            false => &self.on_presence.leave,
        };
        if let Some(callback) = callback {
            callback(member);
        }
    }

    pub(crate) fn gap(&self, gap: Gap) {
        tracing::debug!(
            room = gap.room,
            offset = gap.offset,
            "messages may have been missed"
        );
        if let Some(OnGap(callback)) = &self.on_gap {
            callback(gap);
        }
    }

    /// Opens the first connection (failing at once if it cannot) and starts the client.
    pub async fn connect(self) -> Result<(ThinWsClient, Messages), ClientError> {
        let mut held = held::Held::default();
        let socket = open::open(&self, self.url_for(0), &mut held).await?;
        let (requests, requests_rx) = mpsc::channel(64);
        let (deliveries, deliveries_rx) = mpsc::channel(1024);
        let timeout = self.request_timeout;
        let connected = Arc::new(AtomicBool::new(true));
        tokio::spawn(driver::drive(
            self,
            socket,
            requests_rx,
            deliveries,
            VecDeque::new(),
            connected.clone(),
            held,
        ));
        Ok((
            ThinWsClient {
                requests,
                timeout,
                connected,
                keys: Arc::new(outbox::Keys::new()),
            },
            Messages { rx: deliveries_rx },
        ))
    }
}

/// A ThinWS client; cheap to clone (all clones share one connection).
#[derive(Debug, Clone)]
pub struct ThinWsClient {
    requests: mpsc::Sender<Request>,
    timeout: Duration,
    connected: Arc<AtomicBool>,
    /// Makes the idempotency key of each message sent.
    keys: Arc<outbox::Keys>,
}

impl ThinWsClient {
    /// Connects to `url` (e.g. `ws://127.0.0.1:8080/`) as `connection_id`, with default
    /// settings. See [`ThinWsClient::builder`].
    pub async fn connect(
        url: impl Into<String>,
        connection_id: impl Into<String>,
    ) -> Result<(ThinWsClient, Messages), ClientError> {
        Self::builder(url, connection_id).connect().await
    }

    /// Settings for a client of `url` as `connection_id`.
    pub fn builder(url: impl Into<String>, connection_id: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            url: url.into(),
            more_urls: Vec::new(),
            connection_id: connection_id.into(),
            token: None,
            on_gap: None,
            on_presence: OnPresence::default(),
            tls_ca_pem: None,
            request_timeout: Duration::from_secs(10),
            max_queued: 1024,
            max_backoff: Duration::from_secs(10),
            keepalive: Duration::from_secs(20),
        }
    }

    pub(crate) async fn request(&self, op: Op) -> Result<String, ClientError> {
        let (reply, answer) = oneshot::channel();
        let call = async {
            self.requests
                .send(Request::Op { op, reply })
                .await
                .map_err(|_| ClientError::Closed)?;
            answer.await.unwrap_or(Err(ClientError::Closed))
        };
        tokio::time::timeout(self.timeout, call)
            .await
            .unwrap_or(Err(ClientError::Timeout))
    }

    /// Whether the client is connected (and bound to its identity) right now; `false` while
    /// it reconnects.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Joins `room` (and the server remembers it for this identity).
    pub async fn subscribe(&self, room: impl Into<String>) -> Result<(), ClientError> {
        self.request(Op::Subscribe(room.into())).await.map(drop)
    }

    /// Leaves `room` (and the server forgets it for this identity).
    pub async fn unsubscribe(&self, room: impl Into<String>) -> Result<(), ClientError> {
        self.request(Op::Unsubscribe(room.into())).await.map(drop)
    }

    /// Who is in a room with presence, on every node. A room without presence answers
    /// [`ErrorCode::NotEnabled`].
    pub async fn presence(&self, room: impl Into<String>) -> Result<RoomPresence, ClientError> {
        let ack = self.request(Op::Presence(room.into())).await?;
        let unreadable = || ClientError::Protocol(format!("unreadable presence: {ack}"));
        let Ok(crate::protocol::server::ServerFrame::Ack {
            count: Some(count),
            members: Some(members),
            ..
        }) = crate::protocol::server::parse(&ack)
        else {
            return Err(unreadable());
        };
        Ok(RoomPresence {
            count,
            members: serde_json::from_str(members.get()).map_err(|_| unreadable())?,
        })
    }

    /// Publishes `payload` to every subscriber of `room`, exactly once: resolves when the
    /// server's broker accepted it, sending it again with the same idempotency key after a
    /// `timeout`, an `unavailable` or a lost connection (see the [module docs](self)).
    pub async fn send<T: Serialize + ?Sized>(
        &self,
        room: impl Into<String>,
        payload: &T,
    ) -> Result<(), ClientError> {
        let payload = serde_json::value::to_raw_value(payload)
            .map_err(|e| ClientError::InvalidPayload(Arc::new(e)))?;
        let message = self.keys.outgoing(room.into(), payload);
        self.request(Op::Message(message)).await.map(drop)
    }

    /// Closes the connection cleanly (close code 1000) and stops reconnecting. The
    /// identity keeps its rooms on the server. Other clones fail with
    /// [`ClientError::Closed`] from then on.
    pub async fn close(self) {
        let (done, closed) = oneshot::channel();
        if self.requests.send(Request::Close(done)).await.is_ok() {
            let _ = closed.await;
        }
    }
}

//! The backend the HTTP hooks ask: one pooled client, the signing secret, the forwarded
//! headers, the timeout and the limit on requests in flight, shared by every hook built
//! from it.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http::header::{HeaderName, CONTENT_TYPE};
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sha2::Sha256;
use tokio::sync::Semaphore;

use super::wire::Answer;
use super::{HttpHook, Webhook};
use crate::hooks::{
    ConnectEvent, HookError, MessageEvent, RefreshEvent, SocketInfo, SubscribeEvent,
};

/// The largest answer body read from a backend.
const MAX_ANSWER: usize = 64 * 1024;

/// A hook's URL that cannot be used: not an absolute `http` or `https` URL.
#[derive(Debug, thiserror::Error)]
#[error("a hook URL must be an absolute http:// or https:// URL: {url:?}")]
pub struct InvalidHookUrl {
    url: String,
}

pub(super) fn parse_url(url: &str) -> Result<Uri, InvalidHookUrl> {
    let invalid = || InvalidHookUrl {
        url: url.to_owned(),
    };
    let uri: Uri = url.parse().map_err(|_| invalid())?;
    match (uri.scheme_str(), uri.authority()) {
        (Some("http" | "https"), Some(_)) => Ok(uri),
        _ => Err(invalid()),
    }
}

/// Where HTTP hooks send their events, and how (see the [module](super) docs).
#[derive(Clone)]
pub struct Backend {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    node: String,
    secret: Option<Vec<u8>>,
    headers: Vec<HeaderName>,
    timeout: Duration,
    in_flight: Semaphore,
    prefixes: Vec<String>,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        f.debug_struct("Backend")
            .field("node", &self.inner.node)
            .field("headers", &self.inner.headers)
            .field("timeout", &self.inner.timeout)
            .field("prefixes", &self.inner.prefixes)
            .finish_non_exhaustive()
    }
}

/// Settings of a [`Backend`].
#[derive(Clone)]
#[must_use]
pub struct BackendBuilder {
    node: String,
    secret: Option<Vec<u8>>,
    headers: Vec<HeaderName>,
    timeout: Duration,
    max_in_flight: usize,
    prefixes: Vec<String>,
}

impl std::fmt::Debug for BackendBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        f.debug_struct("BackendBuilder")
            .field("node", &self.node)
            .field("secret", &self.secret.as_ref().map(|_| "***"))
            .field("headers", &self.headers)
            .field("timeout", &self.timeout)
            .field("max_in_flight", &self.max_in_flight)
            .field("prefixes", &self.prefixes)
            .finish()
    }
}

/// Headers a client's upgrade request cannot make the node send to the backend: the
/// request's own framing and routing, and thinws's signature headers.
fn forwardable(name: &HeaderName) -> bool {
    !(name.as_str().starts_with("x-thinws-")
        || name.as_str().starts_with("proxy-")
        || matches!(
            name.as_str(),
            "host"
                | "content-length"
                | "content-type"
                | "transfer-encoding"
                | "connection"
                | "upgrade"
                | "te"
                | "trailer"
                | "keep-alive"
                | "expect"
        ))
}

impl Backend {
    /// Settings with the defaults: a 2 s timeout, 256 requests in flight, no secret, no
    /// forwarded header, every room asked about.
    pub fn builder() -> BackendBuilder {
        BackendBuilder {
            node: String::new(),
            secret: None,
            headers: Vec::new(),
            timeout: Duration::from_secs(2),
            max_in_flight: 256,
            prefixes: Vec::new(),
        }
    }

    /// A `connect` hook asking `url`.
    pub fn connect(&self, url: &str) -> Result<HttpHook<ConnectEvent>, InvalidHookUrl> {
        HttpHook::new(self.clone(), url)
    }

    /// A `subscribe` hook asking `url` (also asked for the rooms a `connect` rejoins).
    pub fn subscribe(&self, url: &str) -> Result<HttpHook<SubscribeEvent>, InvalidHookUrl> {
        HttpHook::new(self.clone(), url)
    }

    /// A `message` hook asking `url` before each publish.
    pub fn publish(&self, url: &str) -> Result<HttpHook<MessageEvent>, InvalidHookUrl> {
        HttpHook::new(self.clone(), url)
    }

    /// A `refresh` hook asking `url`.
    pub fn refresh(&self, url: &str) -> Result<HttpHook<RefreshEvent>, InvalidHookUrl> {
        HttpHook::new(self.clone(), url)
    }

    /// A notification hook (for
    /// [`ThinWsBuilder::on_notification`](crate::ThinWsBuilder::on_notification)) that POSTs
    /// each notification to `url` (see `docs/hooks/webhooks.md`); any 2xx status
    /// acknowledges it, anything else fails it (the node sends it again later). The
    /// backend's room prefixes do not apply: every room's notifications are sent.
    pub fn webhook(&self, url: &str) -> Result<Webhook, InvalidHookUrl> {
        Webhook::new(self.clone(), url)
    }

    pub(super) fn node(&self) -> &str {
        &self.inner.node
    }

    /// Whether an event about `room` (if any) is asked about at all.
    pub(super) fn asks_about(&self, room: Option<&str>) -> bool {
        let prefixes = &self.inner.prefixes;
        match room {
            Some(room) if !prefixes.is_empty() => prefixes.iter().any(|p| room.starts_with(&**p)),
            _ => true,
        }
    }

    /// POSTs `body` for `event` to `url`; the backend's answer, or why there is none
    /// (always [`HookError::Unavailable`]: nothing was decided).
    pub(super) async fn ask(
        &self,
        url: &Uri,
        event: &'static str,
        socket: &SocketInfo,
        body: Vec<u8>,
    ) -> Result<Answer, HookError> {
        let _permit = self.inner.in_flight.try_acquire().map_err(|_| {
            HookError::unavailable("too many requests to the hooks' backend in flight")
        })?;
        let (status, body) = self.exchange(url, event, Some(socket), body).await?;
        if status != StatusCode::OK {
            return Err(HookError::unavailable(format!(
                "the backend answered {status}"
            )));
        }
        Answer::parse(&body?)
    }

    /// POSTs `body` for `event` to `url` (signed, with `socket`'s forwarded headers if
    /// any), and reads the answer, all within the timeout: the status (an error if none
    /// came), and for a 2xx its body, at most 64 KiB (an error if it could not be read: a
    /// webhook, which only needs the status, goes on without it). Other answers' bodies
    /// are not read.
    pub(super) async fn exchange(
        &self,
        url: &Uri,
        event: &'static str,
        socket: Option<&SocketInfo>,
        body: Vec<u8>,
    ) -> Result<(StatusCode, Result<Bytes, HookError>), HookError> {
        let inner = &*self.inner;
        let mut request = Request::post(url.clone())
            .header(CONTENT_TYPE, "application/json")
            .header("x-thinws-event", event);
        if let Some(socket) = socket {
            for name in &inner.headers {
                for value in socket.request().headers.get_all(name) {
                    request = request.header(name, value);
                }
            }
        }
        if let Some(secret) = &inner.secret {
            let (timestamp, signature) = sign(secret, &body);
            request = request
                .header("x-thinws-timestamp", timestamp)
                .header("x-thinws-signature", signature);
        }
        let request = request
            .body(Full::new(Bytes::from(body)))
            .map_err(HookError::unavailable)?;
        let deadline = tokio::time::Instant::now() + inner.timeout;
        let late = || {
            HookError::unavailable(format!(
                "no answer from the backend within {:?}",
                inner.timeout
            ))
        };
        let response = tokio::time::timeout_at(deadline, inner.client.request(request))
            .await
            .map_err(|_| late())?
            .map_err(HookError::unavailable)?;
        let status = response.status();
        if !status.is_success() {
            return Ok((status, Ok(Bytes::new())));
        }
        let read = Limited::new(response.into_body(), MAX_ANSWER).collect();
        let body = match tokio::time::timeout_at(deadline, read).await {
            Ok(Ok(body)) => Ok(body.to_bytes()),
            Ok(Err(e)) => Err(HookError::unavailable(e)),
            Err(_) => Err(late()),
        };
        Ok((status, body))
    }
}

/// `(timestamp, "v1=" + hex(HMAC-SHA256(secret, timestamp + "." + body)))`.
fn sign(secret: &[u8], body: &[u8]) -> (String, String) {
    let timestamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
        .to_string();
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    (timestamp, format!("v1={hex}"))
}

impl BackendBuilder {
    /// How long one event may take, connecting included (default 2 s); past it the client
    /// gets `unavailable`.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Forwards this header of the socket's upgrade request with every event (e.g.
    /// `cookie`, `authorization`, `x-forwarded-for`), so that the backend can authenticate
    /// a browser by its session cookie. The signature covers the body and timestamp, not
    /// these headers. Ignored (with a warning) if it is not a header name, or one that
    /// cannot be forwarded: `Host`, the request's framing (`Content-Length`,
    /// `Transfer-Encoding`, `Connection`, …) and `X-Thinws-*`.
    pub fn forward_header(mut self, name: impl AsRef<str>) -> Self {
        match HeaderName::try_from(name.as_ref()) {
            Ok(name) if forwardable(&name) => self.headers.push(name),
            Ok(name) => tracing::warn!(%name, "this header is not forwarded to the backend"),
            Err(e) => {
                tracing::warn!(name = name.as_ref(), error = %e, "not a header name; not forwarded")
            }
        }
        self
    }

    /// Signs every request with `secret`: `X-Thinws-Timestamp` (Unix seconds) and
    /// `X-Thinws-Signature: v1=<hex HMAC-SHA256 of "timestamp.body">`, so that the backend
    /// can refuse forged or replayed calls.
    pub fn secret(mut self, secret: impl Into<Vec<u8>>) -> Self {
        self.secret = Some(secret.into());
        self
    }

    /// Requests in flight at once for the whole node (default 256); past it the client gets
    /// `unavailable` at once instead of queueing behind a slow backend.
    pub fn max_in_flight(mut self, requests: usize) -> Self {
        self.max_in_flight = requests.clamp(1, Semaphore::MAX_PERMITS);
        self
    }

    /// Asks the backend only about rooms starting with `prefix` (repeatable); events about
    /// other rooms are allowed without a call. Without it, every room is asked about.
    pub fn rooms_with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefixes.push(prefix.into());
        self
    }

    /// The name of this node in every request's `node` field (e.g. its address).
    pub fn node_name(mut self, name: impl Into<String>) -> Self {
        self.node = name.into();
        self
    }

    /// Builds the backend: one pooled HTTP/1.1 and HTTP/2 client (`https` trusting the
    /// system's roots).
    pub fn build(self) -> Backend {
        let https = hyper_rustls::HttpsConnectorBuilder::new();
        let https = match https.with_native_roots() {
            Ok(https) => https,
            Err(e) => {
                tracing::warn!(error = %e, "no system root certificates: https hooks will fail");
                hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(
                    rustls::ClientConfig::builder_with_provider(Arc::new(
                        rustls::crypto::ring::default_provider(),
                    ))
                    .with_safe_default_protocol_versions()
                    .expect("ring supports the default protocol versions")
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth(),
                )
            }
        };
        // Small requests on kept-alive connections: without TCP_NODELAY each one can wait
        // for the peer's delayed ACK (tens of milliseconds).
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(self.timeout));
        let connector = https
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        Backend {
            inner: Arc::new(Inner {
                client,
                node: self.node,
                secret: self.secret,
                headers: self.headers,
                timeout: self.timeout,
                in_flight: Semaphore::new(self.max_in_flight),
                prefixes: self.prefixes,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backend that answers 200 with `body` to every request, on a free port.
    async fn answering(body: Vec<u8>) -> Uri {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let mut request = [0u8; 4096];
                let _ = tcp.read(&mut request).await;
                let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
                let _ = tcp.write_all(head.as_bytes()).await;
                let _ = tcp.write_all(&body).await;
            }
        });
        format!("http://127.0.0.1:{port}/hook").parse().unwrap()
    }

    fn socket() -> SocketInfo {
        SocketInfo {
            id: 1,
            connection_id: "c".into(),
            bound: false,
            request: Arc::new(Request::new(()).into_parts().0),
            granted: Arc::default(),
        }
    }

    #[tokio::test]
    async fn an_answer_over_64_kib_is_a_failure_and_nothing_more_is_held() {
        let backend = Backend::builder().build();
        let big = format!(r#"{{"result":{{"payload":"{}"}}}}"#, "x".repeat(MAX_ANSWER));
        let url = answering(big.into_bytes()).await;
        let asked = backend
            .ask(&url, "publish", &socket(), b"{}".to_vec())
            .await;
        assert!(matches!(asked, Err(HookError::Unavailable(_))), "{asked:?}");
        let small = answering(br#"{"result":{}}"#.to_vec()).await;
        let asked = backend
            .ask(&small, "publish", &socket(), b"{}".to_vec())
            .await;
        assert!(asked.is_ok(), "{asked:?}");
    }

    #[test]
    fn a_signature_is_the_hmac_of_timestamp_dot_body() {
        let (timestamp, signature) = sign(b"key", b"{}");
        let mut mac = Hmac::<Sha256>::new_from_slice(b"key").unwrap();
        mac.update(format!("{timestamp}.{{}}").as_bytes());
        let hex: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(signature, format!("v1={hex}"));
    }

    #[test]
    fn framing_and_signature_headers_are_never_forwarded() {
        let builder = Backend::builder()
            .forward_header("Cookie")
            .forward_header("host")
            .forward_header("Content-Length")
            .forward_header("X-Thinws-Signature")
            .forward_header("transfer-encoding")
            .forward_header("not a header")
            .secret(b"hidden".to_vec());
        assert_eq!(builder.headers, [HeaderName::from_static("cookie")]);
        assert!(!format!("{builder:?}").contains("hidden"), "{builder:?}");
    }

    #[test]
    fn hook_urls_are_absolute_http_or_https() {
        assert!(parse_url("http://127.0.0.1:3000/hooks").is_ok());
        assert!(parse_url("https://backend.example/hooks").is_ok());
        for bad in ["/relative", "ftp://x/y", "not a url", "127.0.0.1:3000"] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }
}

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tower_service::Service;

use super::{client_script, ResponseBody, ResponseFuture, ThinWsLayer};
use crate::config::Config;
use crate::connection;
use crate::error::ConnectError;
use crate::node::Node;
use crate::rooms::Refused;

/// The service built by [`ThinWsLayer`]: upgrade requests on the configured path become
/// ThinWS sockets; everything else goes to the inner service `S` untouched.
#[derive(Clone, Debug)]
#[must_use]
pub struct ThinWsService<S> {
    inner: S,
    config: Arc<Config>,
    node: Result<Arc<Node>, ConnectError>,
}

impl<S> ThinWsService<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Takes the inner service out.
    pub fn into_inner(self) -> S {
        self.inner
    }

    pub(crate) fn new(inner: S, layer: ThinWsLayer) -> Self {
        ThinWsService {
            inner,
            config: layer.config,
            node: layer.node,
        }
    }

    /// Whether this request is one the layer takes over: a `GET` with upgrade headers
    /// (RFC 6455 §4.1) on the configured path.
    fn takes<B>(&self, request: &Request<B>) -> bool {
        request.method() == http::Method::GET
            && self
                .config
                .path
                .as_deref()
                .is_none_or(|path| request.uri().path() == path)
            && hyper_tungstenite::is_upgrade_request(request)
    }
}

/// The 101 answer to an upgrade request (RFC 6455 §4.2.2), and the upgrade it completes.
fn accept<B>(
    request: &mut Request<B>,
) -> Result<(Response<Full<Bytes>>, hyper::upgrade::OnUpgrade), &'static str> {
    use hyper_tungstenite::tungstenite::handshake::derive_accept_key;
    let headers = request.headers();
    let key = headers
        .get(http::header::SEC_WEBSOCKET_KEY)
        .ok_or("no Sec-WebSocket-Key header")?;
    if headers
        .get(http::header::SEC_WEBSOCKET_VERSION)
        .map(http::HeaderValue::as_bytes)
        != Some(b"13")
    {
        return Err("Sec-WebSocket-Version is not 13");
    }
    let accept = derive_accept_key(key.as_bytes());
    let response = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(http::header::CONNECTION, "upgrade")
        .header(http::header::UPGRADE, "websocket")
        .header(http::header::SEC_WEBSOCKET_ACCEPT, accept)
        .body(Full::new(Bytes::new()))
        .map_err(|_| "unusable Sec-WebSocket-Key")?;
    Ok((response, hyper::upgrade::on(request)))
}

fn plain(status: StatusCode, text: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(text)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for ThinWsService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        if self.config.serve_client {
            if let Some(response) = client_script::respond(&request) {
                return ResponseFuture::ready(response);
            }
        }
        if !self.takes(&request) {
            return ResponseFuture::inner(self.inner.call(request));
        }
        if !self.config.origins.permits(request.headers()) {
            return ResponseFuture::ready(plain(
                StatusCode::FORBIDDEN,
                "this Origin may not open sockets here\n".into(),
            ));
        }
        let node = match &self.node {
            Ok(node) => node,
            Err(unusable) => {
                return ResponseFuture::ready(plain(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("{}\n", unusable.report()),
                ))
            }
        };
        // The socket's slot is taken now, before the 101: a burst of upgrades at the limit
        // gets 503s, never a 101 followed by a close.
        let admitted = match connection::admit(node) {
            Ok(admitted) => admitted,
            Err(refused) => {
                let reason = match refused {
                    Refused::ShuttingDown => "server shutting down\n",
                    Refused::Full => "server full, try again later\n",
                };
                return ResponseFuture::ready(plain(
                    StatusCode::SERVICE_UNAVAILABLE,
                    reason.into(),
                ));
            }
        };
        let config = &self.config;
        let ws_config = hyper_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .read_buffer_size(config.read_buffer_size)
            .max_message_size(Some(config.max_frame_size))
            .max_frame_size(Some(config.max_frame_size));
        match accept(&mut request) {
            Ok((response, upgrade)) => {
                let (parts, _body) = request.into_parts();
                let socket = connection::serve(node.clone(), admitted, upgrade, ws_config, parts);
                tokio::spawn(socket);
                ResponseFuture::ready(response)
            }
            Err(e) => {
                admitted.release(node);
                ResponseFuture::ready(plain(
                    StatusCode::BAD_REQUEST,
                    format!("invalid WebSocket upgrade: {e}\n"),
                ))
            }
        }
    }
}

//! The standalone server's own HTTP endpoints behind the ThinWS layer: the demo page,
//! `/healthz`, `/metrics` and the HTTP API.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use metrics_exporter_prometheus::PrometheusHandle;
use thinws::Hub;
use tower_service::Service;

use crate::api;

/// The server's own HTTP endpoints, behind the ThinWS layer.
#[derive(Clone)]
pub struct Endpoints {
    pub hub: Hub,
    pub metrics: PrometheusHandle,
    /// The demo page, with the socket path filled in, unless disabled.
    pub demo: Option<Bytes>,
    pub api: api::Api,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<B> Service<Request<B>> for Endpoints
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        if api::Api::handles(request.uri().path()) {
            let api = self.api.clone();
            return Box::pin(async move { Ok(api.respond(request).await) });
        }
        let hub = self.hub.clone();
        let metrics = self.metrics.clone();
        let path = request.uri().path().to_owned();
        if let (Some(demo), "/") = (&self.demo, path.as_str()) {
            let mut response = Response::new(Full::new(demo.clone()));
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/html; charset=utf-8"),
            );
            return Box::pin(std::future::ready(Ok(response)));
        }
        Box::pin(async move {
            let (status, body) = match path.as_str() {
                "/healthz" => {
                    let health = hub.health().await;
                    let status = if health.is_ready() {
                        StatusCode::OK
                    } else {
                        StatusCode::SERVICE_UNAVAILABLE
                    };
                    (status, format!("{health}\n"))
                }
                "/metrics" => (StatusCode::OK, metrics.render()),
                _ => (StatusCode::NOT_FOUND, "not found\n".to_owned()),
            };
            let mut response = Response::new(Full::new(Bytes::from(body)));
            *response.status_mut() = status;
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            Ok(response)
        })
    }
}

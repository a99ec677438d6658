//! thinws with plain hyper 1: any tower service (here a `service_fn`) wrapped in
//! `ThinWsLayer`, served by `http1::Builder` with upgrades enabled.
//!
//! ```sh
//! cargo run --example hyper
//! ```

use std::convert::Infallible;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use thinws::ThinWsLayer;
use tokio::net::TcpListener;
use tower::{service_fn, Layer};

/// Serves ThinWS sockets with the `/ws` path, and a plain answer everywhere else.
pub async fn serve(listener: TcpListener, layer: ThinWsLayer) {
    let inner = service_fn(|request: Request<hyper::body::Incoming>| async move {
        let body = format!("hello from hyper at {}", request.uri().path());
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
    });
    let service = layer.layer(inner);
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let service = TowerToHyperService::new(service.clone());
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .with_upgrades()
                .await;
        });
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let listener = TcpListener::bind("127.0.0.1:3003").await?;
    println!("hyper + thinws on ws://127.0.0.1:3003/ws");
    serve(listener, ThinWsLayer::builder().path("/ws").build()).await;
    Ok(())
}

//! thinws in front of warp 0.4. warp's own `serve` takes no tower layer, so the filter
//! becomes a tower service (`warp::service`), `ThinWsLayer` wraps it, and hyper-util serves
//! the result with upgrades enabled.
//!
//! ```sh
//! cargo run --example warp
//! ```

use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use thinws::ThinWsLayer;
use tokio::net::TcpListener;
use tower::Layer;
use warp::{Filter, Reply};

/// Serves warp routes with ThinWS sockets on every path, until the task is dropped.
pub async fn serve(listener: TcpListener, layer: ThinWsLayer) {
    let index = warp::path::end().map(|| "hello from warp".into_response());
    let hello =
        warp::path!("hello" / String).map(|name: String| format!("hello, {name}").into_response());
    // Boxed to one concrete reply type: the service future must be `Send` for all
    // lifetimes when it is spawned.
    let routes = index.or(hello).unify().boxed();
    let service = layer.layer(warp::service(routes));
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let service = TowerToHyperService::new(service.clone());
        tokio::spawn(async move {
            // `with_upgrades` is what lets a socket outlive its HTTP request.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .with_upgrades()
                .await;
        });
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let listener = TcpListener::bind("127.0.0.1:3002").await?;
    println!("warp + thinws on ws://127.0.0.1:3002/");
    serve(listener, ThinWsLayer::in_memory()).await;
    Ok(())
}

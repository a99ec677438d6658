//! socketioxide 0.18 + socketioxide-redis, implementing the benchmark's two events the way
//! thinws does: `subscribe` joins a room and acks; `message` broadcasts to the room (the
//! sender included when it is a member) and acks.
//!
//! Usage: socketioxide-peer <port> <redis url>

use axum::serve::ListenerExt;
use serde::Deserialize;
use serde_json::{json, Value};
use socketioxide::adapter::Adapter;
use socketioxide::extract::{AckSender, Data, SocketRef};
use socketioxide::SocketIo;
use socketioxide_redis::{RedisAdapter, RedisAdapterCtr};

#[derive(Deserialize)]
struct Message {
    room: String,
    payload: Value,
}

async fn on_connect<A: Adapter>(socket: SocketRef<A>) {
    socket.on(
        "subscribe",
        async |socket: SocketRef<A>, Data(room): Data<String>, ack: AckSender<A>| {
            socket.join(room);
            let _ = ack.send(&());
        },
    );
    socket.on(
        "message",
        async |socket: SocketRef<A>, Data(message): Data<Message>, ack: AckSender<A>| {
            let out = json!({"room": message.room, "from": socket.id.to_string(), "payload": message.payload});
            let _ = socket.within(message.room).emit("message", &out).await;
            let _ = ack.send(&());
        },
    );
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let port: u16 = args.next().ok_or("port")?.parse()?;
    let redis_url = args.next().ok_or("redis url")?;
    let client = redis::Client::open(format!("{redis_url}?protocol=resp3"))?;
    let adapter = RedisAdapterCtr::new_with_redis(&client).await?;
    let (layer, io) = SocketIo::builder()
        .with_adapter::<RedisAdapter<_>>(adapter)
        .build_layer();
    io.ns("/", on_connect).await?;
    let app = axum::Router::new().layer(layer);
    // TCP_NODELAY on every socket, as thinws and Node's http server do (axum::serve does not
    // set it by default).
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await?
        .tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
    println!("socketioxide peer on {port}");
    axum::serve(listener, app).await?;
    Ok(())
}

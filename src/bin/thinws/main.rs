//! The standalone ThinWS server.
//!
//! ```text
//! thinws --listen 127.0.0.1:8080 [--redis-url redis://127.0.0.1:6379] [--path /ws]
//! ```
//!
//! Without a Redis URL it runs the in-memory single-node hub. `GET /healthz` answers 200
//! when the node can serve and 503 otherwise; `GET /metrics` serves Prometheus metrics. SIGINT/SIGTERM close every socket with 1001
//! and exit 0.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use clap::builder::BoolishValueParser;
use clap::Parser;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use thinws::ThinWsLayer;
use tokio::net::TcpListener;
use tower_layer::Layer;

/// The binary's allocator: jemalloc cut a node's CPU per delivery by about a fifth in the
/// rooms benchmark against glibc's malloc, which spent ~20 % of the node consolidating and
/// unlinking chunks (BENCHMARKS.md finding 26). The library leaves the choice to its users.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

mod accept;
mod api;
mod auth;
mod checks;
mod endpoints;
mod proxy;
mod secrets;

use endpoints::Endpoints;
use secrets::secret_of;

/// ThinWS server: WebSocket rooms that scale out through Redis pub/sub.
#[derive(Debug, Parser)]
#[command(name = "thinws", version)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "THINWS_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Redis to fan out through (`redis://…`, or `rediss://…` for TLS); without it, a single
    /// in-memory node.
    #[arg(long, env = "REDIS_URL")]
    redis_url: Option<String>,
    /// A Redis Cluster node to fan out through instead of one Redis (repeatable; any of its
    /// nodes, the rest are discovered; comma-separated in the environment). Rooms' channels
    /// are then sharded (`SPUBLISH`/`SSUBSCRIBE`, Redis 7 or newer).
    #[arg(
        long = "redis-cluster-url",
        env = "THINWS_REDIS_CLUSTER_URLS",
        value_delimiter = ',',
        conflicts_with = "redis_url"
    )]
    redis_cluster_urls: Vec<String>,
    /// Redis replicas that must confirm a message to a history room (or with an
    /// idempotency key) before its ack (Redis's WAIT); past 40 % of the Redis timeout the client gets
    /// `timeout` instead. 1 on a cluster with a replica per master: an acked message
    /// outlives its master's failover. Default 0 (acked once the master took it).
    #[arg(long, env = "THINWS_REDIS_WAIT_REPLICAS", default_value_t = 0)]
    redis_wait_replicas: u32,
    /// For `rediss://`: a PEM file of the CA that signed Redis's certificate, trusted
    /// beside the system's roots (needed for a private CA, not for managed Redis).
    #[arg(long, env = "THINWS_REDIS_CA_FILE")]
    redis_ca_file: Option<std::path::PathBuf>,
    /// Take over WebSocket upgrades on this path only (default: every path).
    #[arg(long, env = "THINWS_PATH")]
    path: Option<String>,
    /// Prefix of the Redis channels and keys.
    #[arg(long, env = "THINWS_KEY_PREFIX", default_value = "thinws:")]
    key_prefix: String,
    /// On SIGTERM/SIGINT, seconds to go on serving open sockets while refusing new ones
    /// (503, and /healthz 503) before closing them: long enough for a load balancer's
    /// health check to take the node out (see deploy/).
    #[arg(long, env = "THINWS_DRAIN_SECONDS", default_value_t = 0)]
    drain_seconds: u64,
    /// Seconds to wait for sockets to close on shutdown.
    #[arg(long, env = "THINWS_SHUTDOWN_TIMEOUT", default_value_t = 10)]
    shutdown_timeout: u64,
    /// Frames per second each socket may send on average (0: no limit).
    #[arg(long, env = "THINWS_RATE_LIMIT", default_value_t = 100)]
    rate_limit: u32,
    /// Burst of frames each socket may send at once.
    #[arg(long, env = "THINWS_RATE_BURST", default_value_t = 200)]
    rate_burst: u32,
    /// Largest message (and frame) a client may send, in bytes; larger ones close the socket
    /// with 1009.
    #[arg(long, env = "THINWS_MAX_FRAME_SIZE", default_value_t = 64 * 1024)]
    max_frame_size: usize,
    /// Sockets this node accepts at most (lowered to fit the open-file limit).
    #[arg(long, env = "THINWS_MAX_SOCKETS", default_value_t = 100_000)]
    max_sockets: usize,
    /// Connections that may wait for their request head or WebSocket upgrade at once (at
    /// most a quarter of the open-file limit); more wait in the listen backlog.
    #[arg(long, env = "THINWS_MAX_PENDING_CONNECTIONS", default_value_t = 1024)]
    max_pending_connections: usize,
    /// Seconds a connection may take to send its request head (slow clients, slowloris).
    #[arg(long, env = "THINWS_HEADER_READ_TIMEOUT", default_value_t = 10)]
    header_read_timeout: u64,
    /// Seconds an identity's rooms are kept after its last socket went away.
    #[arg(long, env = "THINWS_IDENTITY_TTL", default_value_t = 24 * 60 * 60)]
    identity_ttl: u64,
    /// Messages each room keeps in its history (0: no history). Clients can then recover
    /// what they missed and ask for the last messages.
    #[arg(long, env = "THINWS_HISTORY_SIZE", default_value_t = 0)]
    history_size: usize,
    /// Seconds a room's history lives after its last message.
    #[arg(long, env = "THINWS_HISTORY_TTL", default_value_t = 300)]
    history_ttl: u64,
    /// Seconds a message with an idempotency key is remembered after it was published: a
    /// resend with the same key (same room and identity) within them is answered as a
    /// duplicate and not published again (0: keys are ignored).
    #[arg(long, env = "THINWS_IDEMPOTENCY_WINDOW", default_value_t = 120)]
    idempotency_window: u64,
    /// Every room tracks who is in it, on every node (`presence` requests and
    /// `GET /api/rooms/{roomID}/presence`): one Redis script call per subscribe and
    /// unsubscribe.
    #[arg(long, env = "THINWS_PRESENCE", value_parser = BoolishValueParser::new())]
    presence: bool,
    /// Every room's subscribers get `join` and `leave` events when an identity's first
    /// socket joins or its last leaves (implies --presence; one more publish per change).
    #[arg(long, env = "THINWS_JOIN_LEAVE", value_parser = BoolishValueParser::new())]
    join_leave: bool,
    /// Seconds within which the members of a node that died leave every room.
    #[arg(long, env = "THINWS_PRESENCE_TTL", default_value_t = 30)]
    presence_ttl: u64,
    /// Seconds between heartbeat pings.
    #[arg(long, env = "THINWS_PING_INTERVAL", default_value_t = 25)]
    ping_interval: u64,
    /// Seconds of silence after which a socket is dropped.
    #[arg(long, env = "THINWS_IDLE_TIMEOUT", default_value_t = 60)]
    idle_timeout: u64,
    /// A browser origin allowed to open sockets besides the server's own host (repeatable;
    /// `*` for any). Upgrades from other origins get 403.
    #[arg(
        long = "allowed-origin",
        env = "THINWS_ALLOWED_ORIGINS",
        value_delimiter = ','
    )]
    allowed_origins: Vec<String>,
    /// Require HS256 connection tokens signed with this secret, at least 32 bytes (see the
    /// README's Security section). Prefer --token-secret-file: a command line is visible
    /// to every user of the machine.
    #[arg(
        long,
        env = "THINWS_TOKEN_SECRET",
        conflicts_with_all = ["token_public_key", "token_secret_file"]
    )]
    token_secret: Option<String>,
    /// Like --token-secret, read from this file (a trailing newline is ignored).
    #[arg(
        long,
        env = "THINWS_TOKEN_SECRET_FILE",
        conflicts_with = "token_public_key"
    )]
    token_secret_file: Option<std::path::PathBuf>,
    /// Tokens must name this issuer (`iss`).
    #[arg(long, env = "THINWS_TOKEN_ISSUER")]
    token_issuer: Option<String>,
    /// Tokens must name this audience (`aud`); without it, a token that names an audience
    /// is refused.
    #[arg(long, env = "THINWS_TOKEN_AUDIENCE")]
    token_audience: Option<String>,
    /// Require RS256 or ES256 connection tokens, checked with the public key in this PEM
    /// file.
    #[arg(long, env = "THINWS_TOKEN_PUBLIC_KEY")]
    token_public_key: Option<std::path::PathBuf>,
    /// Seconds a socket may stay without a valid token (or, with --proxy-connect-url,
    /// without a `connect` the backend accepted) before it is closed with 1008.
    #[arg(long, env = "THINWS_AUTH_GRACE", default_value_t = 10)]
    auth_grace: u64,
    /// Turns on the HTTP API (`POST /api/publish`, `GET /api/rooms/{room}`) for requests
    /// with `Authorization: apikey KEY`.
    /// Prefer --api-key-file: a command line is visible to every user of the machine.
    #[arg(long, env = "THINWS_API_KEY", conflicts_with = "api_key_file")]
    api_key: Option<String>,
    /// Like --api-key, read from this file (a trailing newline is ignored).
    #[arg(long, env = "THINWS_API_KEY_FILE")]
    api_key_file: Option<std::path::PathBuf>,
    /// A host name (with its port, if not the default) that browsers reach this server by,
    /// e.g. `chat.example.com` (repeatable): pages on it may open sockets. Loopback names
    /// and IP addresses are always allowed; any other name a page uses is refused 403
    /// unless listed here or by --allowed-origin (a defence against DNS rebinding).
    #[arg(
        long = "public-host",
        env = "THINWS_PUBLIC_HOSTS",
        value_delimiter = ','
    )]
    public_hosts: Vec<String>,
    #[command(flatten)]
    proxy: proxy::ProxyArgs,
    /// Don't serve the demo chat page at `/`.
    #[arg(long, env = "THINWS_NO_DEMO", value_parser = BoolishValueParser::new())]
    no_demo: bool,
}

/// The demo chat page, built on `/thinws.js`.
const DEMO: &str = include_str!("../../../assets/demo.html");

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(reason) => {
            eprintln!("thinws: {reason}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    checks::check(&args)?;
    // Before the layer is built: sockets take their metric handles when they open.
    // Publish latency as a bucketed histogram: it aggregates across nodes in Prometheus
    // (a per-node quantile summary does not), and recording costs a bucket increment
    // instead of a quantile-sketch update per message.
    let metrics = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("thinws_publish_duration_seconds".into()),
            &[
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ],
        )
        .map_err(|e| format!("cannot configure the metrics recorder: {e}"))?
        .install_recorder()
        .map_err(|e| format!("cannot install the metrics recorder: {e}"))?;
    let upkeep = metrics.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(5));
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });
    let capacity = accept::capacity(args.max_sockets, args.max_pending_connections);
    if capacity.sockets < args.max_sockets {
        tracing::info!(
            open_files = capacity.open_files,
            sockets = capacity.sockets,
            "--max-sockets lowered to fit the open-file limit, so that the node answers 503 before it runs out of descriptors"
        );
    }
    let mut builder = ThinWsLayer::builder()
        .serve_client(true)
        .key_prefix(args.key_prefix)
        .rate_limit(args.rate_limit, args.rate_burst)
        .max_frame_size(args.max_frame_size)
        .max_sockets(capacity.sockets)
        .identity_ttl(Duration::from_secs(args.identity_ttl.max(1)))
        .ping_interval(Duration::from_secs(args.ping_interval))
        .idle_timeout(Duration::from_secs(args.idle_timeout));
    if let Some(path) = &args.path {
        builder = builder.path(path);
    }
    if args.history_size > 0 {
        builder = builder.history(thinws::settings::History::new(
            args.history_size,
            Duration::from_secs(args.history_ttl.max(1)),
        ));
    }
    builder = builder
        .idempotency_window(Duration::from_secs(args.idempotency_window))
        .presence(match (args.join_leave, args.presence) {
            (true, _) => thinws::settings::Presence::WithJoinLeave,
            (false, true) => thinws::settings::Presence::On,
            (false, false) => thinws::settings::Presence::Off,
        })
        .presence_ttl(Duration::from_secs(args.presence_ttl.max(1)));
    let expected = auth::Expected {
        issuer: args.token_issuer.clone(),
        audience: args.token_audience.clone(),
    };
    let secret = secret_of(
        "--token-secret",
        args.token_secret.as_deref(),
        args.token_secret_file.as_deref(),
    )?;
    let auth = match (secret, &args.token_public_key) {
        (Some(secret), _) => Some(auth::Auth::from_secret(secret.as_bytes(), &expected)?),
        (None, Some(path)) => {
            let pem =
                std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            Some(
                auth::Auth::from_public_key(&pem, &expected)
                    .map_err(|e| format!("{}: {e}", path.display()))?,
            )
        }
        (None, None) => None,
    };
    if auth.is_none() && (expected.issuer.is_some() || expected.audience.is_some()) {
        return Err(
            "--token-issuer and --token-audience need --token-secret(-file) or --token-public-key"
                .into(),
        );
    }
    let api_key = secret_of(
        "--api-key",
        args.api_key.as_deref(),
        args.api_key_file.as_deref(),
    )?;
    let open_to_anyone = auth.is_none() && !args.proxy.decides_identities();
    if auth.is_some() && args.proxy.any() {
        return Err("signed tokens (--token-secret-file, --token-public-key) and hooks over HTTP (--proxy-*-url) cannot be combined yet: let the backend check the token at connect instead".into());
    }
    let grace = Duration::from_secs(args.auth_grace.max(1));
    builder = args.proxy.apply(builder, args.listen.to_string(), grace)?;
    if let Some(auth) = auth {
        tracing::info!("sockets must connect with a signed token");
        builder = auth.apply(builder, grace);
    }
    // Pages from loopback and IP hosts (the demo), the named public hosts, and whatever is
    // listed.
    builder = builder.allow_same_host_origin();
    for host in &args.public_hosts {
        builder = builder.public_host(host);
    }
    for origin in &args.allowed_origins {
        builder = builder.allow_origin(origin);
    }
    if open_to_anyone && !args.listen.ip().is_loopback() {
        tracing::warn!(
            listen = %args.listen,
            "listening beyond loopback without tokens: anyone who reaches this address may connect as any identity and use any room (set --token-secret-file or --token-public-key; --allowed-origin and --public-host limit which web pages may open sockets)"
        );
    } else if open_to_anyone {
        // On loopback: a developer's machine, or a node behind a proxy, which makes it as
        // open as the proxy.
        tracing::info!(
            listen = %args.listen,
            "no tokens and no --proxy-connect-url: any client that reaches this node (through a proxy in front of it too) may connect as any identity and use any room"
        );
    }
    if let Some(path) = &args.redis_ca_file {
        let pem =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        builder = builder.redis_ca_pem(pem);
    }
    builder = builder.redis_wait_replicas(args.redis_wait_replicas);
    let layer = match &args.redis_url {
        None if !args.redis_cluster_urls.is_empty() => {
            let layer = builder
                .redis_cluster(args.redis_cluster_urls.clone())
                .connect()
                .await
                .map_err(|e| e.report())?;
            tracing::info!("fanning out through a Redis Cluster (sharded pub/sub)");
            layer
        }
        Some(url) => {
            let layer = builder
                .redis_url(url)
                .connect()
                .await
                .map_err(|e| e.report())?;
            tracing::info!("fanning out through Redis");
            layer
        }
        None => {
            tracing::info!("no Redis URL given: running the in-memory single-node hub");
            builder.build()
        }
    };
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let hub = layer.hub();
    let ws_path = args.path.clone().unwrap_or_else(|| "/".to_owned());
    let demo = (!args.no_demo).then(|| Bytes::from(DEMO.replace("{{WS_PATH}}", &ws_path)));
    let api = api::Api::new(hub.clone(), api_key, args.max_frame_size);
    let service = layer.layer(Endpoints {
        hub: hub.clone(),
        metrics,
        demo,
        api,
    });
    tracing::info!(
        "listening on ws://{addr}{ws_path}  (health: http://{addr}/healthz, metrics: http://{addr}/metrics)"
    );
    if !args.no_demo {
        // Printed plainly, so that whoever ran the command sees where to click.
        println!("thinws demo chat: http://{addr}/");
    }

    let header_read_timeout = Duration::from_secs(args.header_read_timeout.max(1));
    let drain = Duration::from_secs(args.drain_seconds);
    let draining = hub.clone();
    let stop = async move {
        shutdown_signal().await;
        if !drain.is_zero() {
            tracing::info!(
                ?drain,
                "draining: refusing new sockets, serving the open ones"
            );
            draining.drain();
            // The whole drain even when no socket is left: it is there for the load
            // balancer's health check to see the node go, before it stops listening. A
            // second signal cuts it short.
            tokio::select! {
                () = tokio::time::sleep(drain) => {}
                () = shutdown_signal() => tracing::info!("a second signal: draining cut short"),
            }
        }
    };
    accept::accept_loop(listener, capacity.pending, stop, |tcp, permit| {
        let service = TowerToHyperService::new(service.clone());
        tokio::spawn(async move {
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_read_timeout)
                .serve_connection(TokioIo::new(tcp), service)
                .with_upgrades()
                .await;
            // Upgraded (the socket now counts toward --max-sockets) or done.
            drop(permit);
            if let Err(e) = served {
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
        });
    })
    .await;
    let sockets = hub.socket_count();
    tracing::info!(sockets, "shutting down: closing sockets with 1001");
    let left = tokio::select! {
        left = hub.shutdown(Duration::from_secs(args.shutdown_timeout)) => left,
        () = shutdown_signal() => {
            tracing::warn!("a second signal: not waiting for the sockets any longer");
            hub.socket_count()
        }
    };
    if left > 0 {
        tracing::warn!(left, "sockets still open at the shutdown deadline");
    }
    tracing::info!("stopped");
    Ok(())
}

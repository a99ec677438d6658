//! Hooks over HTTP for the standalone server: `--proxy-connect-url` and friends ask the
//! operator's backend, in any language, at each event, and `--webhook-url` tells it what
//! happened (see docs/hooks/).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use thinws::hooks::http::Backend;
use thinws::ThinWsBuilder;

use crate::secrets::secret_of;

/// The flags of the HTTP hooks.
#[derive(Debug, Args)]
pub struct ProxyArgs {
    /// A backend URL asked at every `connect`: it may refuse, assign the identity and
    /// attach `meta` (hooks over HTTP: see docs/hooks/).
    #[arg(long, env = "THINWS_PROXY_CONNECT_URL")]
    proxy_connect_url: Option<String>,
    /// A backend URL asked at every `subscribe` (and for each room a `connect` rejoins).
    #[arg(long, env = "THINWS_PROXY_SUBSCRIBE_URL")]
    proxy_subscribe_url: Option<String>,
    /// A backend URL asked before every publish: it may refuse or rewrite the payload.
    #[arg(long, env = "THINWS_PROXY_PUBLISH_URL")]
    proxy_publish_url: Option<String>,
    /// A backend URL asked at every `refresh` (a new credential for an open socket).
    #[arg(long, env = "THINWS_PROXY_REFRESH_URL")]
    proxy_refresh_url: Option<String>,
    /// A backend URL told what happened, after the fact (webhooks): a room became occupied
    /// or vacant across every node, an identity joined or left a presence room, a socket
    /// ended. Signed like the proxy; retried until it answers 2xx (see
    /// docs/hooks/webhooks.md).
    #[arg(long, env = "THINWS_WEBHOOK_URL")]
    webhook_url: Option<String>,
    /// Notifications held for the webhook while it is down or slow (spread over 4 lanes by
    /// room); past it a lane's oldest are dropped (and counted in
    /// thinws_notifications_dropped_total).
    #[arg(long, env = "THINWS_WEBHOOK_QUEUE", default_value_t = 10_000)]
    webhook_queue: usize,
    /// Seconds the backend may take per event (decimals allowed); past it the client gets
    /// `unavailable` and nothing happens.
    #[arg(long, env = "THINWS_PROXY_TIMEOUT", default_value_t = 2.0)]
    proxy_timeout: f64,
    /// A header of the socket's upgrade request forwarded with every event, e.g. `Cookie`
    /// (repeatable; comma-separated in the environment).
    #[arg(
        long = "proxy-header",
        env = "THINWS_PROXY_HEADERS",
        value_delimiter = ','
    )]
    proxy_headers: Vec<String>,
    /// Only rooms starting with this prefix ask the backend (repeatable); other rooms cost
    /// no HTTP call. Default: every room.
    #[arg(
        long = "proxy-room-prefix",
        env = "THINWS_PROXY_ROOM_PREFIXES",
        value_delimiter = ','
    )]
    proxy_room_prefixes: Vec<String>,
    /// Requests to the backend in flight at once on this node; past it, `unavailable`.
    #[arg(long, env = "THINWS_PROXY_MAX_IN_FLIGHT", default_value_t = 256)]
    proxy_max_in_flight: usize,
    /// Signs every request, webhooks included (HMAC-SHA256 over the timestamp and body),
    /// with the secret in this file, so that the backend can refuse forged or replayed
    /// calls.
    #[arg(long, env = "THINWS_PROXY_SECRET_FILE")]
    proxy_secret_file: Option<PathBuf>,
}

impl ProxyArgs {
    /// Whether `connect` asks a backend (which then decides who may connect as whom).
    pub fn decides_identities(&self) -> bool {
        self.proxy_connect_url.is_some()
    }

    /// Whether any event asks a backend.
    pub fn any(&self) -> bool {
        self.proxy_connect_url.is_some()
            || self.proxy_subscribe_url.is_some()
            || self.proxy_publish_url.is_some()
            || self.proxy_refresh_url.is_some()
    }

    /// Sets the hooks these flags ask for on `builder`.
    pub fn apply(&self, mut builder: ThinWsBuilder, node: String) -> Result<ThinWsBuilder, String> {
        let timeout = Duration::try_from_secs_f64(self.proxy_timeout)
            .ok()
            .filter(|timeout| !timeout.is_zero() && *timeout <= Duration::from_secs(3600))
            .ok_or("--proxy-timeout must be a number of seconds above 0, up to 3600")?;
        let mut backend = Backend::builder()
            .timeout(timeout)
            .max_in_flight(self.proxy_max_in_flight)
            .node_name(node);
        for header in &self.proxy_headers {
            backend = backend.forward_header(header.trim());
        }
        for prefix in &self.proxy_room_prefixes {
            backend = backend.rooms_with_prefix(prefix);
        }
        if let Some(secret) = secret_of("--proxy-secret", None, self.proxy_secret_file.as_deref())?
        {
            backend = backend.secret(secret.into_bytes());
        }
        let backend = backend.build();
        let invalid = |e: thinws::hooks::http::InvalidHookUrl| e.to_string();
        if let Some(url) = &self.proxy_connect_url {
            builder = builder.on_connect(backend.connect(url).map_err(invalid)?);
        }
        if let Some(url) = &self.proxy_subscribe_url {
            builder = builder.on_subscribe(backend.subscribe(url).map_err(invalid)?);
        }
        if let Some(url) = &self.proxy_publish_url {
            builder = builder.on_message(backend.publish(url).map_err(invalid)?);
        }
        if let Some(url) = &self.proxy_refresh_url {
            builder = builder.on_refresh(backend.refresh(url).map_err(invalid)?);
        }
        if let Some(url) = &self.webhook_url {
            builder = builder
                .on_notification(backend.webhook(url).map_err(invalid)?)
                .notification_queue(self.webhook_queue);
        }
        Ok(builder)
    }
}

//! Hooks over HTTP for the standalone server: `--proxy-connect-url` and friends ask the
//! operator's backend, in any language, at each event, and `--webhook-url` tells it what
//! happened (see docs/hooks/).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use thinws::hooks::http::{Backend, HttpHook};
use thinws::hooks::{HookError, MessageEvent, MessageVerdict, SubscribeEvent, Verdict};
use thinws::ThinWsBuilder;
use tower::{service_fn, ServiceExt};

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
    /// Room notifications held for the webhook while it is down or slow (spread over 4
    /// lanes by room; as many disconnects again, and at most 16 MiB of each kind per
    /// lane); past it a lane's oldest of the kind are dropped (and counted in
    /// thinws_notifications_dropped_total).
    #[arg(long, env = "THINWS_WEBHOOK_QUEUE", default_value_t = 10_000)]
    webhook_queue: usize,
    /// Seconds the backend may take per event (decimals allowed); past it the client gets
    /// `unavailable` and nothing happens.
    #[arg(long, env = "THINWS_PROXY_TIMEOUT", default_value_t = 2.0)]
    proxy_timeout: f64,
    /// This node's name in every request to the backend (`node`), which with the socket's
    /// `id` names a socket across the cluster. Default: the listen address, which nodes in
    /// containers often share (`0.0.0.0:8080`): set a name of each node's own there.
    #[arg(long, env = "THINWS_NODE_NAME")]
    node_name: Option<String>,
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

    /// Sets the hooks these flags ask for on `builder`; `listen` names the node unless
    /// `--node-name` does. With `--proxy-connect-url`, the backend decides who a socket is,
    /// so a socket must `connect` first: until then its `subscribe` and `message` are
    /// refused (`forbidden`), whatever the room, and it is closed with 1008 if it has not
    /// connected within `grace`.
    pub fn apply(
        &self,
        mut builder: ThinWsBuilder,
        listen: String,
        grace: Duration,
    ) -> Result<ThinWsBuilder, String> {
        let timeout = Duration::try_from_secs_f64(self.proxy_timeout)
            .ok()
            .filter(|timeout| !timeout.is_zero() && *timeout <= Duration::from_secs(3600))
            .ok_or("--proxy-timeout must be a number of seconds above 0, up to 3600")?;
        let mut backend = Backend::builder()
            .timeout(timeout)
            .max_in_flight(self.proxy_max_in_flight)
            .node_name(self.node_name.clone().unwrap_or(listen));
        for header in &self.proxy_headers {
            backend = backend.forward_header(header.trim());
        }
        // "private:, admin:" is two prefixes, not " admin:", which no room would match.
        for prefix in &self.proxy_room_prefixes {
            backend = backend.rooms_with_prefix(prefix.trim());
        }
        if let Some(secret) = secret_of("--proxy-secret", None, self.proxy_secret_file.as_deref())?
        {
            backend = backend.secret(secret.into_bytes());
        }
        let backend = backend.build();
        let invalid = |e: thinws::hooks::http::InvalidHookUrl| e.to_string();
        let subscribe = self.proxy_subscribe_url.as_deref();
        let subscribe = subscribe.map(|url| backend.subscribe(url)).transpose();
        let publish = self.proxy_publish_url.as_deref();
        let publish = publish.map(|url| backend.publish(url)).transpose();
        let (subscribe, publish) = (subscribe.map_err(invalid)?, publish.map_err(invalid)?);
        if let Some(url) = &self.proxy_connect_url {
            builder = builder
                .on_connect(backend.connect(url).map_err(invalid)?)
                .require_connect_within(grace)
                .on_subscribe(connected_first(subscribe))
                .on_message(connected_first(publish));
        } else {
            if let Some(hook) = subscribe {
                builder = builder.on_subscribe(hook);
            }
            if let Some(hook) = publish {
                builder = builder.on_message(hook);
            }
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

/// An event a socket that has not connected may not cause when the backend decides
/// identities, and the verdicts that answer it.
trait ConnectFirst: Send + 'static {
    type Verdict: Send + 'static;
    fn bound(&self) -> bool;
    fn allowed() -> Self::Verdict;
    fn refused() -> Self::Verdict;
}

/// What a socket that has not connected is told.
const CONNECT_FIRST: &str = "connect first";

impl ConnectFirst for SubscribeEvent {
    type Verdict = Verdict;
    fn bound(&self) -> bool {
        self.socket().has_bound_identity()
    }
    fn allowed() -> Verdict {
        Verdict::Allow
    }
    fn refused() -> Verdict {
        Verdict::refuse(CONNECT_FIRST)
    }
}

impl ConnectFirst for MessageEvent {
    type Verdict = MessageVerdict;
    fn bound(&self) -> bool {
        self.socket().has_bound_identity()
    }
    fn allowed() -> MessageVerdict {
        MessageVerdict::Allow
    }
    fn refused() -> MessageVerdict {
        MessageVerdict::refuse(CONNECT_FIRST)
    }
}

/// Refuses an event from a socket that has not connected, then asks `hook` (if any).
fn connected_first<E: ConnectFirst>(
    hook: Option<HttpHook<E>>,
) -> impl tower::Service<E, Response = E::Verdict, Error = HookError, Future = impl Send + 'static>
       + Clone
       + Send
       + Sync
       + 'static
where
    HttpHook<E>: tower::Service<E, Response = E::Verdict, Error = HookError>,
    <HttpHook<E> as tower::Service<E>>::Future: Send,
{
    service_fn(move |event: E| {
        let hook = hook.clone();
        async move {
            match hook {
                _ if !event.bound() => Ok(E::refused()),
                Some(hook) => hook.oneshot(event).await,
                None => Ok(E::allowed()),
            }
        }
    })
}

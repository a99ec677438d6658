//! Hooks that ask your backend over HTTP, in any language: a hook is a tower service, so a
//! remote hook is a tower service that speaks HTTP (feature `http-hooks`, part of `server`).
//!
//! Each event (`connect`, `subscribe`, `publish`, `refresh`) is one signed `POST` of JSON to
//! the URL you give it; the answer allows, refuses with a code and a reason the client sees,
//! assigns the identity and attaches `meta` at connect, or rewrites a message. A backend
//! that is down, slow or answers nonsense gives the client `unavailable` (nothing happened)
//! within the timeout, and the socket goes on. The wire contract, with examples, is in
//! `docs/hooks/`.
//!
//! Every hook made by one [`Backend`] shares its pooled HTTP/1.1 and HTTP/2 client
//! (keep-alive, `https` with the system's roots), its timeout, its limit on requests in
//! flight, its signing secret and the upgrade headers it forwards.
//!
//! ```
//! use std::time::Duration;
//! use thinws::hooks::http::Backend;
//!
//! let backend = Backend::builder()
//!     .timeout(Duration::from_secs(2))
//!     .forward_header("cookie")
//!     .secret(b"a secret of at least 32 bytes, shared".to_vec())
//!     .rooms_with_prefix("private:") // other rooms cost no HTTP call
//!     .build();
//! let layer = thinws::ThinWsLayer::builder()
//!     .on_connect(backend.connect("http://127.0.0.1:3000/thinws/connect")?)
//!     .on_subscribe(backend.subscribe("http://127.0.0.1:3000/thinws/subscribe")?)
//!     .on_message(backend.publish("http://127.0.0.1:3000/thinws/publish")?)
//!     .build();
//! # let _ = layer;
//! # Ok::<(), thinws::hooks::http::InvalidHookUrl>(())
//! ```
//!
//! Notifications (webhooks: a room became occupied or vacant, an identity joined or left a
//! presence room, a socket ended) go to [`Backend::webhook`], set with
//! [`ThinWsBuilder::on_notification`](crate::ThinWsBuilder::on_notification).
//!
//! They compose with tower middleware like any hook, e.g.
//! `ServiceBuilder::new().concurrency_limit(64).service(backend.subscribe(url))`.

mod backend;
mod webhook;
mod wire;

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Uri;
use tower_service::Service;

pub use self::backend::{Backend, BackendBuilder, InvalidHookUrl};
pub use self::webhook::Webhook;
pub use self::wire::Meta;
use self::wire::ProxyEvent;
use super::{ConnectEvent, HookError, MessageEvent, RefreshEvent, SubscribeEvent};

/// A hook for events of type `E` that asks the backend at one URL (see [`Backend`]).
pub struct HttpHook<E> {
    backend: Backend,
    url: Arc<Uri>,
    event: PhantomData<fn(E)>,
}

impl<E> Clone for HttpHook<E> {
    fn clone(&self) -> Self {
        HttpHook {
            backend: self.backend.clone(),
            url: self.url.clone(),
            event: PhantomData,
        }
    }
}

impl<E> std::fmt::Debug for HttpHook<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpHook").field("url", &self.url).finish()
    }
}

impl<E: ProxyEvent> Service<E> for HttpHook<E> {
    type Response = E::Verdict;
    type Error = HookError;
    type Future = Pin<Box<dyn Future<Output = Result<E::Verdict, HookError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), HookError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, event: E) -> Self::Future {
        let (backend, url) = (self.backend.clone(), self.url.clone());
        Box::pin(async move {
            if !backend.asks_about(event.room()) {
                return Ok(E::unasked());
            }
            let body = event.body(backend.node());
            let answer = backend.ask(&url, E::NAME, event.socket(), body).await?;
            event.verdict(answer)
        })
    }
}

/// A `connect` hook on a [`Backend`] of its own with the default settings.
pub fn connect(url: &str) -> Result<HttpHook<ConnectEvent>, InvalidHookUrl> {
    Backend::builder().build().connect(url)
}

/// A `subscribe` hook on a [`Backend`] of its own with the default settings.
pub fn subscribe(url: &str) -> Result<HttpHook<SubscribeEvent>, InvalidHookUrl> {
    Backend::builder().build().subscribe(url)
}

/// A `message` (publish) hook on a [`Backend`] of its own with the default settings.
pub fn publish(url: &str) -> Result<HttpHook<MessageEvent>, InvalidHookUrl> {
    Backend::builder().build().publish(url)
}

/// A `refresh` hook on a [`Backend`] of its own with the default settings.
pub fn refresh(url: &str) -> Result<HttpHook<RefreshEvent>, InvalidHookUrl> {
    Backend::builder().build().refresh(url)
}

/// A notification hook (webhook) on a [`Backend`] of its own with the default settings.
pub fn webhook(url: &str) -> Result<Webhook, InvalidHookUrl> {
    Backend::builder().build().webhook(url)
}

impl<E> HttpHook<E> {
    fn new(backend: Backend, url: &str) -> Result<Self, InvalidHookUrl> {
        let url = Arc::new(backend::parse_url(url)?);
        Ok(HttpHook {
            backend,
            url,
            event: PhantomData,
        })
    }
}

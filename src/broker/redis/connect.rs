//! Connection setup: the Redis URL, parsed once, and the `deadpool-redis` pool built on it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deadpool_redis::{Manager, Pool, Runtime};
use redis::{AsyncConnectionConfig, ConnectionInfo, IntoConnectionInfo, ProtocolVersion};

use crate::error::{BrokerError, ConnectError, ErrorSource};

/// How many pooled connections a node may open beyond those its publishing lanes hold
/// (identity commands and health probes share them).
const SHARED_CONNECTIONS: usize = 8;

/// A parsed Redis URL.
#[derive(Debug, Clone)]
pub(crate) struct RedisTarget {
    info: ConnectionInfo,
    /// For `rediss://`: the pub/sub connection's TLS connector.
    #[cfg(feature = "tls")]
    tls: Option<super::tls::Tls>,
}

impl RedisTarget {
    /// Parses `url`; `ca_pem` is a private CA to trust for `rediss://` (beside the system's
    /// roots). The error redacts any password.
    pub(crate) fn parse(url: &str, ca_pem: Option<&[u8]>) -> Result<Self, InvalidUrl> {
        let invalid = |source: ErrorSource| InvalidUrl {
            url: redact(url),
            source,
        };
        let info = url
            .into_connection_info()
            .map_err(|e| invalid(Arc::new(e)))?;
        let is_tls = matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. });
        #[cfg(feature = "tls")]
        {
            if let redis::ConnectionAddr::TcpTls { insecure: true, .. } = info.addr() {
                return Err(invalid(Arc::new(std::io::Error::other(
                    "rediss://…#insecure skips certificate checks and is not supported: give the server's CA instead",
                ))));
            }
            let (info, tls) = match is_tls {
                false => (info, None),
                true => {
                    let tls = super::tls::Tls::new(ca_pem).map_err(|e| invalid(Arc::new(e)))?;
                    let info = match ca_pem {
                        None => info,
                        Some(pem) => redis::Client::build_with_tls(
                            info,
                            redis::TlsCertificates {
                                client_tls: None,
                                root_cert: Some(pem.to_vec()),
                            },
                        )
                        .map_err(|e| invalid(Arc::new(e)))?
                        .get_connection_info()
                        .clone(),
                    };
                    (info, Some(tls))
                }
            };
            Ok(RedisTarget { info, tls })
        }
        #[cfg(not(feature = "tls"))]
        {
            let _ = ca_pem;
            if is_tls {
                return Err(invalid(Arc::new(std::io::Error::other(
                    "rediss:// needs thinws's `tls` cargo feature",
                ))));
            }
            Ok(RedisTarget { info })
        }
    }

    /// The TLS connector for a `rediss://` target.
    #[cfg(feature = "tls")]
    pub(crate) fn tls(&self) -> Option<&super::tls::Tls> {
        self.tls.as_ref()
    }

    /// The same settings (TLS, user name, password) for the node at `host`:`port` (a
    /// cluster master).
    pub(crate) fn at(&self, host: &str, port: u16) -> RedisTarget {
        let addr = match self.info.addr() {
            redis::ConnectionAddr::TcpTls {
                insecure,
                tls_params,
                ..
            } => redis::ConnectionAddr::TcpTls {
                host: host.to_owned(),
                port,
                insecure: *insecure,
                tls_params: tls_params.clone(),
            },
            _ => redis::ConnectionAddr::Tcp(host.to_owned(), port),
        };
        RedisTarget {
            info: self.info.clone().set_addr(addr),
            #[cfg(feature = "tls")]
            tls: self.tls.clone(),
        }
    }

    /// The settings of a RESP3 connection to this target, which calls `lost` when its
    /// connection is lost (a `Disconnection` push), with these timeouts.
    pub(crate) fn resp3(
        &self,
        connect: Duration,
        response: Option<Duration>,
        lost: impl Fn() + Send + Sync + 'static,
    ) -> (ConnectionInfo, AsyncConnectionConfig) {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(connect))
            .set_response_timeout(response)
            .set_push_sender(move |push: redis::PushInfo| {
                if push.kind == redis::PushKind::Disconnection {
                    lost();
                }
                Ok::<(), std::convert::Infallible>(())
            });
        let settings = self.info.redis_settings().clone();
        let info =
            (self.info.clone()).set_redis_settings(settings.set_protocol(ProtocolVersion::RESP3));
        (info, config)
    }

    /// The connection settings (address, user name, password, database).
    pub(crate) fn info(&self) -> &ConnectionInfo {
        &self.info
    }

    /// A pool for `lanes` publishing lanes plus the shared connections, each wait, connect
    /// and recycle taking at most `timeout`. Connects lazily.
    ///
    /// Connections speak RESP3 so that each can report its own loss (a `Disconnection`
    /// push); every loss bumps the returned counter, which the lanes read before sending.
    pub(crate) fn pool(
        &self,
        lanes: usize,
        timeout: Duration,
    ) -> Result<(Pool, Disconnects), BrokerError> {
        let disconnects = Disconnects::default();
        let seen = disconnects.clone();
        // Every caller bounds its whole operation with `timeout` itself.
        let (info, config) = self.resp3(timeout, None, move || seen.bump());
        let manager = Manager::new_with_config(info, config).map_err(BrokerError::connection)?;
        let pool = Pool::builder(manager)
            .max_size(lanes + SHARED_CONNECTIONS)
            .wait_timeout(Some(timeout))
            .create_timeout(Some(timeout))
            .recycle_timeout(Some(timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(BrokerError::connection)?;
        Ok((pool, disconnects))
    }
}

/// An unusable Redis URL (redacted), and why.
#[derive(Debug, Clone)]
pub(crate) struct InvalidUrl {
    url: String,
    source: ErrorSource,
}

impl InvalidUrl {
    pub(crate) fn new(url: &str, why: &str) -> Self {
        InvalidUrl {
            url: redact(url),
            source: Arc::new(std::io::Error::other(why.to_owned())),
        }
    }
}

impl From<InvalidUrl> for ConnectError {
    fn from(e: InvalidUrl) -> Self {
        ConnectError::InvalidRedisUrl {
            url: e.url,
            source: e.source,
        }
    }
}

/// How many pooled connections were lost so far.
#[derive(Debug, Clone, Default)]
pub(crate) struct Disconnects(Arc<AtomicU64>);

impl Disconnects {
    fn bump(&self) {
        self.0.fetch_add(1, Ordering::AcqRel);
    }

    /// The count now.
    pub(crate) fn current(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }
}

/// Bounds `fut` by `timeout`.
pub(crate) async fn within<T>(
    timeout: Duration,
    fut: impl std::future::Future<Output = Result<T, BrokerError>>,
) -> Result<T, BrokerError> {
    tokio::time::timeout(timeout, fut)
        .await
        .unwrap_or(Err(BrokerError::Timeout(timeout)))
}

/// A duration in whole milliseconds as Redis takes it (`PX`, `PEXPIRE`): at least 1, as
/// Redis refuses 0.
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// Classifies a redis-rs error: an error reply from Redis, or a failed connection.
/// Whether a Redis that reports `version` (`INFO server`'s `redis_version`) runs thinws's
/// scripts: 6.2 or newer (`RPOP` with a count, `HRANDFIELD`). A version it cannot read
/// is taken as supported (Redis-compatible servers number theirs differently).
pub(crate) fn is_supported(version: &str) -> bool {
    let mut parts = version.split('.').map(|part| part.parse::<u32>());
    match (parts.next(), parts.next()) {
        (Some(Ok(major)), Some(Ok(minor))) => (major, minor) >= (6, 2),
        _ => true,
    }
}

pub(crate) fn redis_error(e: redis::RedisError) -> BrokerError {
    match e.kind() {
        redis::ErrorKind::Server(_) | redis::ErrorKind::Extension => {
            BrokerError::Refused(Arc::new(e))
        }
        _ => BrokerError::connection(e),
    }
}

/// Redis's error reply to one command: it refused the command, which did nothing.
pub(crate) fn refused(e: redis::ServerError) -> BrokerError {
    BrokerError::Refused(Arc::new(redis::RedisError::from(e)))
}

/// A pool error: a timeout, or a connection that could not be made.
pub(crate) fn pool_error(e: deadpool_redis::PoolError) -> BrokerError {
    match e {
        deadpool_redis::PoolError::Backend(e) => redis_error(e),
        e => BrokerError::connection(e),
    }
}

/// Hides a password in a Redis URL before it reaches an error message or a log.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact("redis://:secret@h:6379/0"), "redis://***@h:6379/0");
        assert_eq!(redact("redis://h:6379"), "redis://h:6379");
    }

    #[test]
    fn a_bad_url_is_refused_without_its_password() {
        let e =
            ConnectError::from(RedisTarget::parse("redis://:secret@h:notaport", None).unwrap_err());
        assert!(!e.to_string().contains("secret"), "{e}");
        assert!(std::error::Error::source(&e).is_some());
    }

    #[test]
    fn redis_older_than_6_2_is_not_supported() {
        for old in ["6.0.9", "6.0.16", "5.0.14", "6.1.0"] {
            assert!(!is_supported(old), "{old}");
        }
        for new in ["6.2.0", "6.2.14", "7.0.15", "10.0.1", "", "unknown", "7"] {
            assert!(is_supported(new), "{new}");
        }
    }
}

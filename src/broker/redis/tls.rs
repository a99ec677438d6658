//! TLS to Redis (`rediss://`, cargo feature `tls`): one rustls client configuration per
//! target, trusting the system's roots and, if one is given, a private CA. The pool's
//! connections (redis-rs) get the same CA through `redis::TlsCertificates`; the pub/sub
//! connection, read by hand (see `resp`), wraps its TCP stream with this connector.

use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::error::BrokerError;

/// Opens TLS connections to one Redis target.
#[derive(Clone)]
pub(crate) struct Tls {
    connector: TlsConnector,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls")
    }
}

impl Tls {
    /// A connector trusting the system's roots and the certificates in `ca_pem`, if any.
    pub(crate) fn new(ca_pem: Option<&[u8]>) -> Result<Self, crate::tls::TlsConfigError> {
        Ok(Tls {
            connector: TlsConnector::from(crate::tls::client_config(ca_pem)?),
        })
    }

    /// Completes a TLS handshake with `host` over `stream`.
    pub(crate) async fn connect(
        &self,
        host: &str,
        stream: TcpStream,
    ) -> Result<TlsStream<TcpStream>, BrokerError> {
        let name = ServerName::try_from(host.to_owned()).map_err(BrokerError::connection)?;
        self.connector
            .connect(name, stream)
            .await
            .map_err(BrokerError::connection)
    }
}

//! Which `Origin`s may open sockets: the defence against cross-site WebSocket hijacking.
//!
//! Browsers send the page's origin with every WebSocket upgrade, and, unlike for a `fetch`,
//! no CORS check stops a page on another site from opening a socket with the user's
//! cookies. So the layer can check it: an upgrade whose `Origin` is not allowed gets
//! `403 Forbidden`. Requests without an `Origin` (non-browser clients) are not checked,
//! since nothing stops such a client from sending any header it likes.

use http::header::{HOST, ORIGIN};
use http::HeaderMap;

/// The origins allowed to open sockets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct OriginPolicy {
    /// Exact origins (`scheme://host[:port]`), lower-cased, default ports removed.
    allowed: Vec<String>,
    /// Whether an origin whose host (and port) is the request's `Host` is allowed, for a
    /// loopback or IP `Host` or one of `public_hosts`.
    same_host: bool,
    /// Host names (`name` or `name:port`, lower-cased) that pages may use with
    /// `same_host`, besides loopback names and IP addresses.
    public_hosts: Vec<String>,
    /// Whether any origin is allowed (the default while nothing else is set).
    any: bool,
}

impl OriginPolicy {
    /// Every origin allowed: the library's default, for compatibility.
    pub(crate) fn any() -> Self {
        OriginPolicy {
            any: true,
            ..OriginPolicy::default()
        }
    }

    /// Allows `origin` (`"*"`: every origin). The first rule ends the allow-all default.
    pub(crate) fn allow(&mut self, origin: &str) {
        if origin.trim() == "*" {
            self.any = true;
            return;
        }
        if self.allowed.is_empty() && !self.same_host {
            self.any = false;
        }
        self.allowed.push(normalize(origin));
    }

    /// Allows origins on the request's own host. The first rule ends the allow-all default.
    pub(crate) fn allow_same_host(&mut self) {
        if self.allowed.is_empty() && !self.same_host {
            self.any = false;
        }
        self.same_host = true;
    }

    /// Adds a host name that pages on the same host may open sockets from (and allows
    /// same-host origins).
    pub(crate) fn public_host(&mut self, host: &str) {
        self.allow_same_host();
        self.public_hosts.push(host.trim().to_ascii_lowercase());
    }

    /// Whether `host` (a `Host` header's value, lower-cased) is one that pages on the same
    /// host may use: a loopback name, an IP address, or a named public host. Any other
    /// name could be an attacker's domain rebound to this server's address.
    fn trusted_host(&self, host: &str) -> bool {
        let name = host_name(host);
        name == "localhost"
            || name.ends_with(".localhost")
            || name.parse::<std::net::IpAddr>().is_ok()
            || self
                .public_hosts
                .iter()
                .any(|public| public == host || public == name)
    }

    /// Whether a request with these headers may upgrade.
    pub(crate) fn permits(&self, headers: &HeaderMap) -> bool {
        if self.any {
            return true;
        }
        let Some(origin) = headers.get(ORIGIN) else {
            return true;
        };
        let Ok(origin) = origin.to_str() else {
            return false;
        };
        let origin = normalize(origin);
        if self.allowed.contains(&origin) {
            return true;
        }
        let Some(authority) = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
        else {
            return false;
        };
        self.same_host
            && headers
                .get(HOST)
                .and_then(|host| host.to_str().ok())
                .is_some_and(|host| {
                    let host = host.to_ascii_lowercase();
                    (authority == host
                        || authority == strip_port(&host, ":80")
                        || authority == strip_port(&host, ":443"))
                        && self.trusted_host(&host)
                })
    }
}

/// The name of `host[:port]` (an IPv6 literal without its brackets).
fn host_name(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    host.rsplit_once(':').map_or(host, |(name, _)| name)
}

fn strip_port<'a>(host: &'a str, port: &str) -> &'a str {
    host.strip_suffix(port).unwrap_or(host)
}

/// `Scheme://Host:443` → `scheme://host`: lower case, no default port, no trailing slash.
fn normalize(origin: &str) -> String {
    let origin = origin.trim().trim_end_matches('/').to_ascii_lowercase();
    for (scheme, port) in [
        ("http://", ":80"),
        ("https://", ":443"),
        ("ws://", ":80"),
        ("wss://", ":443"),
    ] {
        if origin.starts_with(scheme) {
            if let Some(stripped) = origin.strip_suffix(port) {
                return stripped.to_owned();
            }
        }
    }
    origin
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(origin: Option<&str>, host: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(HOST, host.parse().unwrap());
        if let Some(origin) = origin {
            h.insert(ORIGIN, origin.parse().unwrap());
        }
        h
    }

    #[test]
    fn the_default_allows_everything() {
        assert!(OriginPolicy::any().permits(&headers(Some("https://evil.example"), "app")));
    }

    #[test]
    fn an_allow_list_with_the_same_host() {
        let mut p = OriginPolicy::any();
        p.allow_same_host();
        p.allow("https://App.Example:443/");
        p.public_host("api.example");
        let ok = [
            (Some("https://app.example"), "api.example"),
            (Some("http://api.example:8080"), "api.example:8080"),
            (Some("http://api.example"), "api.example:80"),
            (Some("https://api.example"), "API.example"),
            (None, "api.example"),
        ];
        for (origin, host) in ok {
            assert!(p.permits(&headers(origin, host)), "{origin:?} {host}");
        }
        let refused = [
            (Some("https://evil.example"), "api.example"),
            (Some("http://api.example:8081"), "api.example:8080"),
            (Some("https://app.example.evil"), "api.example"),
            (Some("null"), "api.example"),
            (Some("ftp://api.example"), "api.example"),
        ];
        for (origin, host) in refused {
            assert!(!p.permits(&headers(origin, host)), "{origin:?} {host}");
        }
        p.allow("*");
        assert!(p.permits(&headers(Some("https://evil.example"), "api.example")));
    }

    #[test]
    fn same_host_admits_only_loopback_ip_and_named_hosts() {
        let mut p = OriginPolicy::any();
        p.allow_same_host();
        p.public_host("chat.example:8443");
        let ok = [
            ("http://127.0.0.1:8080", "127.0.0.1:8080"),
            ("http://localhost:8080", "localhost:8080"),
            ("http://app.localhost:3000", "app.localhost:3000"),
            ("http://[::1]:8080", "[::1]:8080"),
            ("https://10.1.2.3", "10.1.2.3"),
            ("https://chat.example:8443", "chat.example:8443"),
        ];
        for (origin, host) in ok {
            assert!(p.permits(&headers(Some(origin), host)), "{origin} {host}");
        }
        // DNS rebinding: a name the operator never named, even when Origin and Host agree.
        let refused = [
            ("http://evil.com:8080", "evil.com:8080"),
            ("http://chat.example:8080", "chat.example:8080"),
            ("ftp://127.0.0.1:8080", "127.0.0.1:8080"),
            ("ws://127.0.0.1:8080", "127.0.0.1:8080"),
            ("http://localhost.evil.com:8080", "localhost.evil.com:8080"),
        ];
        for (origin, host) in refused {
            assert!(!p.permits(&headers(Some(origin), host)), "{origin} {host}");
        }
    }
}

//! The upgrade request's head, as a socket keeps it for its hooks.

use http::request::Parts;

/// The upgrade request's head with its URI and headers copied into allocations of their own.
///
/// hyper parses a request head as slices of the connection's read buffer (8 KiB or more), so
/// keeping the parsed head for a socket's life would keep that whole buffer alive. The copy
/// costs a few hundred bytes. Extensions are moved as they are.
pub(super) fn detach(parts: Parts) -> Parts {
    let mut head = http::Request::new(()).into_parts().0;
    head.method = parts.method;
    head.version = parts.version;
    head.uri = match http::Uri::try_from(parts.uri.to_string()) {
        Ok(uri) => uri,
        Err(e) => {
            // A URI's own text always parses again; keep the original if it ever does not.
            debug_assert!(false, "a URI did not parse back: {e}");
            parts.uri
        }
    };
    head.headers.reserve(parts.headers.len());
    for (name, value) in &parts.headers {
        let Ok(mut copy) = http::HeaderValue::from_bytes(value.as_bytes()) else {
            debug_assert!(false, "a header value did not copy: {value:?}");
            continue;
        };
        copy.set_sensitive(value.is_sensitive());
        head.headers.append(name.clone(), copy);
    }
    head.extensions = parts.extensions;
    head
}

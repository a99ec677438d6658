//! The browser client, `thinws.js`, served by the layer when
//! [`ThinWsBuilder::serve_client`](super::ThinWsBuilder::serve_client) is on.

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;

/// The client as a classic script (defines `ThinWSClient` and `ThinWSError` globally).
pub(crate) const SCRIPT: &str = include_str!("../../assets/thinws.js");

/// The same client as an ES module.
pub(crate) const MODULE: &str = concat!(
    include_str!("../../assets/thinws.js"),
    "\nexport const ThinWSClient = globalThis.ThinWSClient;\n",
    "export const ThinWSError = globalThis.ThinWSError;\n",
    "export default ThinWSClient;\n"
);

/// The drop-in for the original ThinWS client (its API exactly, with backoff).
pub(crate) const COMPAT: &str = include_str!("../../assets/thinws-compat.js");

/// FNV-1a of the script, so that the ETag changes whenever the script does.
const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0100_0000_01b3);
        i += 1;
    }
    hash
}

/// The ETag of a body: each served body has its own, so a cached script never answers for
/// the module or the other way round.
fn etag(body: &str) -> String {
    format!("\"{:016x}\"", fnv1a(body.as_bytes()))
}

/// The response for `GET`/`HEAD /thinws.js`, `/thinws.mjs` or `/thinws-compat.js`, or
/// `None` for any other request.
pub(crate) fn respond<B>(request: &Request<B>) -> Option<Response<Full<Bytes>>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return None;
    }
    let body = match request.uri().path() {
        "/thinws.js" => SCRIPT,
        "/thinws.mjs" => MODULE,
        "/thinws-compat.js" => COMPAT,
        _ => return None,
    };
    let etag = etag(body);
    let fresh = request
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|tag| tag.trim() == etag || tag.trim() == "*")
        });
    let (status, body) = if fresh {
        (StatusCode::NOT_MODIFIED, Bytes::new())
    } else if request.method() == Method::HEAD {
        (StatusCode::OK, Bytes::new())
    } else {
        (StatusCode::OK, Bytes::from_static(body.as_bytes()))
    };
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/javascript; charset=utf-8"),
    );
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=3600"),
    );
    if let Ok(value) = HeaderValue::from_str(&etag) {
        headers.insert(header::ETAG, value);
    }
    Some(response)
}

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::Response;
use http_body_util::Full;
use pin_project::pin_project;

use super::ResponseBody;

/// The response future of [`ThinWsService`](super::ThinWsService).
#[pin_project]
#[derive(Debug)]
#[must_use]
pub struct ResponseFuture<F> {
    #[pin]
    kind: Kind<F>,
}

#[pin_project(project = KindProj)]
#[derive(Debug)]
enum Kind<F> {
    Inner(#[pin] F),
    Ready(Option<Response<Full<Bytes>>>),
}

impl<F> ResponseFuture<F> {
    pub(crate) fn inner(future: F) -> Self {
        ResponseFuture {
            kind: Kind::Inner(future),
        }
    }

    pub(crate) fn ready(response: Response<Full<Bytes>>) -> Self {
        ResponseFuture {
            kind: Kind::Ready(Some(response)),
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Inner(future) => future
                .poll(cx)
                .map(|result| result.map(|response| response.map(ResponseBody::inner))),
            KindProj::Ready(response) => match response.take() {
                Some(response) => Poll::Ready(Ok(response.map(ResponseBody::own))),
                None => panic!("ResponseFuture polled after completion"),
            },
        }
    }
}

//! The upgraded connection, split into the half tungstenite reads and the half the writer
//! writes.
//!
//! When the server handed hyper a plain TCP stream (`TokioIo<TcpStream>`, as thinws's
//! binary and hyper's own `http1` servers do), the stream comes back out of hyper's
//! `Upgraded` and splits into owned halves: no lock between the halves, no boxed connection
//! behind a vtable, and vectored writes reach the kernel as one `writev`. Any other
//! connection (TLS, or a server that wraps the stream, as hyper-util's auto-detecting one
//! does for axum's `serve`) is read and written through `Upgraded`, split by tokio.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

type Wrapped = TokioIo<Upgraded>;

/// Splits `upgraded` (see the module's docs).
pub(super) fn split(upgraded: Upgraded) -> (ReadSide, WriteSide) {
    let upgraded = match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => {
            let (read, write) = parts.io.into_inner().into_split();
            // What hyper read past the upgrade request (a client that did not wait for
            // the 101) is read first. Copied: the slice would keep hyper's whole read
            // buffer (8 KiB or more) alive for the socket's life, even empty.
            let first = match parts.read_buf.is_empty() {
                true => Bytes::new(),
                false => Bytes::copy_from_slice(&parts.read_buf),
            };
            return (ReadSide::Tcp(first, read), WriteSide::Tcp(write));
        }
        Err(upgraded) => upgraded,
    };
    let (read, write) = tokio::io::split(TokioIo::new(upgraded));
    (ReadSide::Upgraded(read), WriteSide::Upgraded(write))
}

/// The half tungstenite reads.
#[derive(Debug)]
pub(super) enum ReadSide {
    /// Bytes to read before the stream's, and the stream.
    Tcp(Bytes, OwnedReadHalf),
    Upgraded(tokio::io::ReadHalf<Wrapped>),
}

/// The half the writer writes. Dropping it ends the connection's writing (TCP: `FIN`).
#[derive(Debug)]
pub(super) enum WriteSide {
    Tcp(OwnedWriteHalf),
    Upgraded(tokio::io::WriteHalf<Wrapped>),
}

impl AsyncRead for ReadSide {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ReadSide::Tcp(first, read) if first.is_empty() => Pin::new(read).poll_read(cx, buf),
            ReadSide::Tcp(first, _) => {
                let len = first.len().min(buf.remaining());
                buf.put_slice(&first.split_to(len));
                Poll::Ready(Ok(()))
            }
            ReadSide::Upgraded(read) => Pin::new(read).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for WriteSide {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            WriteSide::Tcp(write) => Pin::new(write).poll_write(cx, buf),
            WriteSide::Upgraded(write) => Pin::new(write).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            WriteSide::Tcp(write) => Pin::new(write).poll_write_vectored(cx, bufs),
            WriteSide::Upgraded(write) => Pin::new(write).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            WriteSide::Tcp(write) => write.is_write_vectored(),
            WriteSide::Upgraded(write) => write.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteSide::Tcp(write) => Pin::new(write).poll_flush(cx),
            WriteSide::Upgraded(write) => Pin::new(write).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteSide::Tcp(write) => Pin::new(write).poll_shutdown(cx),
            WriteSide::Upgraded(write) => Pin::new(write).poll_shutdown(cx),
        }
    }
}

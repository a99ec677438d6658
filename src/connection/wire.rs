//! The socket's two halves on the wire: tungstenite reads (and answers pings and the
//! client's close itself), and the socket's writer writes the frames it sends without it.
//!
//! A server's frames are unmasked (RFC 6455 §5.1), so a delivery's frame is the same bytes
//! for every member of its room: the writer puts a 2-to-10-byte header before the payload
//! that every member shares, and sends every frame queued since its last write in one
//! vectored write, with no copy of the payload in user space. What tungstenite writes while
//! reading (pongs, the reply to the client's close) lands in [`Control`] and goes out
//! first in the writer's next write.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use hyper::upgrade::Upgraded;
use hyper_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use hyper_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use hyper_tungstenite::tungstenite::Utf8Bytes;
use hyper_tungstenite::WebSocketStream;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::outbound::OutboundQueue;
use super::pending::Pending;

/// The socket as tungstenite sees it: the read half, and [`Control`] to write to. Boxed:
/// the socket's task moves it from state to state, and async functions keep room for each
/// copy.
pub(super) type WsStream = Box<WebSocketStream<SocketIo>>;

/// The most bytes tungstenite may leave in [`Control`] before its writes wait (a client
/// that pings and does not read).
const MAX_CONTROL_BYTES: usize = 16 * 1024;

/// At most this many frames go in one write (a vectored write takes at most 1,024 slices on
/// Linux, two per frame written from where it is).
const FRAMES_PER_WRITE: usize = 500;

/// A write takes frames until it holds this many bytes of payload (and one more frame): what
/// a client does not take stays in the writer, so this bounds it.
const BYTES_PER_WRITE: usize = 64 * 1024;

/// Payloads this long or longer are written from the buffer the room shares; shorter ones
/// are copied next to their headers. The kernel copies many small slices of a vectored
/// write more slowly than user space copies them into one (profiled: fanout of ~100-byte
/// frames spent 19 % of the node in `_copy_from_iter` with a slice per header and payload,
/// 4 % with one buffer).
const ZERO_COPY_FROM: usize = 1024;

/// A buffer this large is given back after its write rather than kept for the next.
const KEEP_BUFFER_UP_TO: usize = 1024;

/// Splits an upgraded connection into the stream tungstenite reads and the writer's half.
pub(super) async fn open(
    upgraded: Upgraded,
    config: WebSocketConfig,
    queue: Arc<OutboundQueue>,
) -> (WsStream, FrameWriter, Arc<Control>) {
    let (read, write) = super::halves::split(upgraded);
    let control = Arc::new(Control {
        bytes: Mutex::default(),
        pending: AtomicBool::new(false),
        peer_closed: AtomicBool::new(false),
        queue,
    });
    let io = SocketIo {
        read,
        control: control.clone(),
    };
    // tungstenite writes only pongs and close replies: at once, not once 128 KiB gathered.
    let config = config.write_buffer_size(0);
    let stream = Box::new(WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await);
    (stream, FrameWriter::new(write), control)
}

/// What tungstenite wrote while reading, waiting for the writer.
#[derive(Debug)]
pub(super) struct Control {
    bytes: Mutex<Vec<u8>>,
    /// Whether `bytes` holds any: the socket's task asks at every turn, without the lock.
    pending: AtomicBool,
    /// The client's close frame was read (and tungstenite queued its reply).
    peer_closed: AtomicBool,
    /// Its writer is woken when bytes arrive.
    queue: Arc<OutboundQueue>,
}

impl Control {
    /// Takes what tungstenite wrote.
    pub(super) fn take(&self) -> Vec<u8> {
        if !self.has_bytes() {
            return Vec::new();
        }
        let mut bytes = self.bytes.lock().unwrap_or_else(PoisonError::into_inner);
        self.pending.store(false, Ordering::Release);
        std::mem::take(&mut *bytes)
    }

    /// The client's close frame was read: tungstenite has answered it.
    pub(super) fn peer_closed(&self) {
        self.peer_closed.store(true, Ordering::Release);
    }

    /// Keeps what tungstenite wrote for the writer, and wakes it; `false` (nothing kept)
    /// when that would hold more than [`MAX_CONTROL_BYTES`].
    fn push(&self, buf: &[u8]) -> bool {
        let mut bytes = self.bytes.lock().unwrap_or_else(PoisonError::into_inner);
        if !bytes.is_empty() && bytes.len() + buf.len() > MAX_CONTROL_BYTES {
            return false;
        }
        bytes.extend_from_slice(buf);
        self.pending.store(true, Ordering::Release);
        drop(bytes);
        self.queue.wake_writer();
        true
    }

    /// Whether tungstenite wrote anything not yet taken.
    pub(super) fn has_bytes(&self) -> bool {
        self.pending.load(Ordering::Acquire)
    }

    /// Whether the client's close was read (and answered).
    pub(super) fn is_peer_closed(&self) -> bool {
        self.peer_closed.load(Ordering::Acquire)
    }
}

/// The read half, with tungstenite's writes going to [`Control`].
#[derive(Debug)]
pub(super) struct SocketIo {
    read: super::halves::ReadSide,
    control: Arc<Control>,
}

impl AsyncRead for SocketIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.read).poll_read(cx, buf)
    }
}

impl AsyncWrite for SocketIo {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.control.push(buf) {
            true => Poll::Ready(Ok(buf.len())),
            // tungstenite keeps the frame and tries again after its next read.
            false => Poll::Pending,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// The header of an unmasked, final frame with `opcode` and a payload of `len` bytes.
fn header(opcode: u8, len: usize) -> ([u8; 10], usize) {
    let mut header = [0; 10];
    header[0] = 0x80 | opcode;
    match len {
        0..=125 => {
            header[1] = len as u8;
            (header, 2)
        }
        126..=0xFFFF => {
            header[1] = 126;
            header[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            (header, 4)
        }
        _ => {
            header[1] = 127;
            header[2..10].copy_from_slice(&(len as u64).to_be_bytes());
            (header, 10)
        }
    }
}

const TEXT: u8 = 0x1;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;

/// The writer's half of the socket.
///
/// Cancel-safe: a write dropped part-way leaves what it had begun in `rest` (its frames
/// taken out of the caller's queue), and [`FrameWriter::finish`] or the next write sends
/// it first, so the stream never carries half a frame followed by another.
pub(super) struct FrameWriter<W = super::halves::WriteSide> {
    io: W,
    /// Bytes handed to this writer and not written yet, from `rest_at` on.
    rest: Vec<u8>,
    rest_at: usize,
    /// Bytes were written and not flushed since: a connection that buffers (TLS) may hold
    /// them until it is flushed, so a flush cut short is finished by the next write.
    unflushed: bool,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    fn new(io: W) -> Self {
        FrameWriter {
            io,
            rest: Vec::new(),
            rest_at: 0,
            unflushed: false,
        }
    }

    /// Writes `control` (tungstenite's bytes), then every frame of `frames` as a text
    /// frame, taking them out of `frames`, then flushes; returns how many frames it wrote.
    pub(super) async fn write_texts(
        &mut self,
        control: &[u8],
        frames: &mut Pending,
    ) -> io::Result<u64> {
        self.add_control(control);
        let mut written = 0;
        std::future::poll_fn(|cx| self.poll_write_texts(cx, frames, &mut written)).await?;
        Ok(written)
    }

    /// Adds `control` (tungstenite's bytes) to what the next write sends first.
    pub(super) fn add_control(&mut self, control: &[u8]) {
        // Rare (pongs, a close reply): after what a write had begun, before any frame.
        self.rest.extend_from_slice(control);
    }

    /// [`FrameWriter::write_texts`] (after [`FrameWriter::add_control`]) as a poll, for a
    /// caller that keeps no future between polls: everything begun is in `rest` and what
    /// is left in `frames`, and the next poll goes on from there. `written` counts the
    /// frames handed to the connection.
    pub(super) fn poll_write_texts(
        &mut self,
        cx: &mut Context<'_>,
        frames: &mut Pending,
        written: &mut u64,
    ) -> Poll<io::Result<()>> {
        loop {
            std::task::ready!(self.poll_finish(cx))?;
            if frames.is_empty() {
                std::task::ready!(Pin::new(&mut self.io).poll_flush(cx))?;
                self.unflushed = false;
                return Poll::Ready(Ok(()));
            }
            let mut count = 0;
            let mut bytes = 0;
            for frame in frames.iter() {
                if count == FRAMES_PER_WRITE || bytes >= BYTES_PER_WRITE {
                    break;
                }
                bytes += frame.len();
                count += 1;
            }
            std::task::ready!(self.poll_start(cx, frames.iter().take(count)))?;
            // Written, or what is left of them is in `rest`.
            frames.advance(count);
            *written += count as u64;
        }
    }

    /// Gathers `frames` into `rest` for [`FrameWriter::poll_finish`] to write. When the
    /// connection takes vectored writes and a payload has [`ZERO_COPY_FROM`] bytes or more,
    /// such payloads are written from where they are instead, with one vectored write for
    /// the lot, and what that write did not take is copied into `rest`. `rest` is untouched
    /// until that write is done: a poll that finds the connection full leaves everything
    /// as it was.
    fn poll_start<'a>(
        &mut self,
        cx: &mut Context<'_>,
        frames: impl Iterator<Item = &'a Utf8Bytes> + Clone,
    ) -> Poll<io::Result<()>> {
        let FrameWriter {
            io,
            rest,
            rest_at,
            unflushed,
        } = self;
        debug_assert!(*rest_at == 0 && rest.is_empty());
        let zero_copy =
            io.is_write_vectored() && frames.clone().any(|frame| frame.len() >= ZERO_COPY_FROM);
        if !zero_copy {
            for frame in frames {
                let (header, len) = header(TEXT, frame.len());
                rest.extend_from_slice(&header[..len]);
                rest.extend_from_slice(frame.as_bytes());
            }
            return Poll::Ready(Ok(()));
        }
        // Headers and short payloads, and the long payloads each after an offset in them.
        let mut gathered = Vec::new();
        let mut apart: Vec<(usize, &Utf8Bytes)> = Vec::new();
        for frame in frames {
            let (header, len) = header(TEXT, frame.len());
            gathered.extend_from_slice(&header[..len]);
            match frame.len() >= ZERO_COPY_FROM {
                true => apart.push((gathered.len(), frame)),
                false => gathered.extend_from_slice(frame.as_bytes()),
            }
        }
        let mut slices = Vec::with_capacity(2 * apart.len() + 1);
        let mut at = 0;
        for (end, payload) in &apart {
            slices.push(IoSlice::new(&gathered[at..*end]));
            slices.push(IoSlice::new(payload.as_bytes()));
            at = *end;
        }
        slices.push(IoSlice::new(&gathered[at..]));
        let written = std::task::ready!(Pin::new(&mut *io).poll_write_vectored(cx, &slices))?;
        if written == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        *unflushed = true;
        let mut left = &mut slices[..];
        IoSlice::advance_slices(&mut left, written);
        for slice in left.iter() {
            rest.extend_from_slice(slice);
        }
        Poll::Ready(Ok(()))
    }

    /// Whether bytes wait: in `rest` (a write dropped part-way, or a queued ping, see
    /// [`FrameWriter::finish`]), or in the connection, written and not flushed.
    pub(super) fn is_unfinished(&self) -> bool {
        self.rest_at < self.rest.len() || self.unflushed
    }

    /// Writes what waits in `rest` (what a write dropped part-way had begun, a queued
    /// ping). Cancel-safe.
    pub(super) async fn finish(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_finish(cx)).await
    }

    /// [`FrameWriter::finish`] as a poll.
    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.rest_at < self.rest.len() {
            let written = std::task::ready!(
                Pin::new(&mut self.io).poll_write(cx, &self.rest[self.rest_at..])
            )?;
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.rest_at += written;
            self.unflushed = true;
        }
        self.rest_at = 0;
        self.rest.clear();
        if self.rest.capacity() > KEEP_BUFFER_UP_TO {
            self.rest = Vec::new();
        }
        Poll::Ready(Ok(()))
    }

    /// Queues a ping, written first by the next write (or [`FrameWriter::finish`]).
    pub(super) fn queue_ping(&mut self) {
        let (header, len) = header(PING, 0);
        self.rest.extend_from_slice(&header[..len]);
    }

    /// Writes `control`, then a close frame with `code` and `reason` (an empty one without
    /// a code), and flushes.
    pub(super) async fn close(
        &mut self,
        control: &[u8],
        code: Option<(CloseCode, &str)>,
    ) -> io::Result<()> {
        let payload = code.map(|(code, reason)| {
            // A close frame's payload is at most 125 bytes (RFC 6455 §5.5).
            let reason = &reason.as_bytes()[..reason.len().min(123)];
            (u16::from(code), reason)
        });
        let len = payload.map_or(0, |(_, reason)| 2 + reason.len());
        let (header, header_len) = header(CLOSE, len);
        let mut frame = Vec::with_capacity(header_len + len);
        frame.extend_from_slice(&header[..header_len]);
        if let Some((code, reason)) = payload {
            frame.extend_from_slice(&code.to_be_bytes());
            frame.extend_from_slice(reason);
        }
        self.write_raw(control, &frame).await
    }

    async fn write_raw(&mut self, control: &[u8], frame: &[u8]) -> io::Result<()> {
        self.finish().await?;
        self.rest.extend_from_slice(control);
        self.rest.extend_from_slice(frame);
        self.finish().await?;
        self.io.flush().await?;
        self.unflushed = false;
        Ok(())
    }

    /// Shuts the write half down (TCP FIN).
    pub(super) async fn shutdown(&mut self) -> io::Result<()> {
        self.io.shutdown().await
    }
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;
    use hyper_tungstenite::tungstenite::Message;

    use super::*;

    fn texts() -> Pending {
        [0, 125, 126, 0xFFFF, 0x1_0000]
            .into_iter()
            .map(|len| Utf8Bytes::from("x".repeat(len)))
            .collect()
    }

    /// A connection that takes every write but holds the bytes until a flush, and whose
    /// first flush does not finish at once (as TLS may when the socket is full).
    #[derive(Default)]
    struct Buffering {
        held: Vec<u8>,
        sent: Vec<u8>,
        flushes_tried: usize,
    }

    impl AsyncWrite for Buffering {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.held.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.flushes_tried += 1;
            if self.flushes_tried == 1 {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let held = std::mem::take(&mut self.held);
            self.sent.extend_from_slice(&held);
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// A write cut short while its flush waits leaves the writer unfinished, so that the
    /// socket's task writes again and the flush completes; otherwise the frames would sit
    /// in the connection's buffer until some later write.
    #[test]
    fn a_flush_cut_short_is_finished_by_the_next_write() {
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut writer = FrameWriter::new(Buffering::default());
        let mut frames: Pending = ["a", "b"].into_iter().collect();
        let mut written = 0;
        assert!(writer
            .poll_write_texts(&mut cx, &mut frames, &mut written)
            .is_pending());
        assert_eq!((written, frames.len()), (2, 0), "both frames handed over");
        assert!(writer.io.sent.is_empty(), "nothing flushed yet");
        // The write is dropped here (another event came first).
        assert!(writer.is_unfinished(), "the flush still has to happen");
        assert!(matches!(
            writer.poll_write_texts(&mut cx, &mut frames, &mut written),
            Poll::Ready(Ok(()))
        ));
        assert_eq!(writer.io.sent.len(), 6, "two 1-byte text frames");
        assert!(!writer.is_unfinished());
    }

    /// Writes [`texts`], a ping and a close with `writer`, and reads them back as a client.
    async fn round_trip<W, R>(mut writer: FrameWriter<W>, client: R)
    where
        W: AsyncWrite + Unpin + Send + 'static,
        R: AsyncRead + AsyncWrite + Unpin,
    {
        let writing = tokio::spawn(async move {
            let written = writer.write_texts(&[], &mut texts()).await.unwrap();
            assert_eq!(written, 5);
            writer.queue_ping();
            writer.finish().await.unwrap();
            let close = Some((CloseCode::Again, "outbound queue full"));
            writer.close(&[], close).await.unwrap();
            // Kept until the client is done: it answers the ping.
            writer
        });
        let mut read = WebSocketStream::from_raw_socket(client, Role::Client, None).await;
        for text in texts().iter() {
            assert_eq!(
                read.next().await.unwrap().unwrap(),
                Message::Text(text.clone())
            );
        }
        assert!(matches!(read.next().await, Some(Ok(Message::Ping(_)))));
        match read.next().await {
            Some(Ok(Message::Close(Some(close)))) => {
                assert_eq!(close.code, CloseCode::Again);
                assert_eq!(close.reason.as_str(), "outbound queue full");
            }
            other => panic!("expected the close frame, got {other:?}"),
        }
        writing.await.unwrap();
    }

    /// A connection without vectored writes: frames are gathered, then written.
    #[tokio::test]
    async fn tungstenite_reads_what_the_writer_writes_gathered() {
        let (client, server) = tokio::io::duplex(4096);
        round_trip(FrameWriter::new(server), client).await;
    }

    /// A TCP connection: one vectored write per batch, finished by hand when the kernel
    /// takes part of it.
    #[tokio::test]
    async fn tungstenite_reads_what_the_writer_writes_vectored() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        let server = accepted.unwrap().0;
        assert!(server.is_write_vectored());
        round_trip(FrameWriter::new(server), client.unwrap()).await;
    }

    /// A write dropped part-way (a close requested while the client does not read) is
    /// finished first: the client reads whole frames, then the close.
    #[tokio::test]
    async fn a_write_dropped_part_way_is_finished_before_the_close() {
        let (client, server) = tokio::io::duplex(64);
        let mut writer = FrameWriter::new(server);
        let mut frames = texts();
        let write = writer.write_texts(&[], &mut frames);
        let stuck = tokio::time::timeout(std::time::Duration::from_millis(50), write).await;
        assert!(stuck.is_err(), "nobody reads: the write waits");
        assert!(writer.is_unfinished());
        let taken = texts().len() - frames.len();
        assert!(taken > 0, "the frames begun were taken out of the queue");
        let reading = tokio::spawn(async move {
            let mut read = WebSocketStream::from_raw_socket(client, Role::Client, None).await;
            let mut texts = 0;
            loop {
                match read.next().await {
                    Some(Ok(Message::Text(_))) => texts += 1,
                    Some(Ok(Message::Close(close))) => return (texts, close.unwrap().code),
                    other => panic!("expected whole frames, then the close: {other:?}"),
                }
            }
        });
        writer.finish().await.unwrap();
        let close = Some((CloseCode::Again, "outbound queue full"));
        writer.close(&[], close).await.unwrap();
        assert_eq!(reading.await.unwrap(), (taken, CloseCode::Again));
    }

    /// A client that pings and never reads: the pongs waiting for the writer stay under
    /// the bound, and what is refused waits in tungstenite (which keeps one pong).
    #[test]
    fn what_tungstenite_writes_is_held_within_its_bound() {
        let control = Control {
            bytes: Mutex::default(),
            pending: AtomicBool::new(false),
            peer_closed: AtomicBool::new(false),
            queue: Arc::new(OutboundQueue::new(16, 1 << 20)),
        };
        let pong = [0x8A, 0];
        let mut kept = 0;
        while control.push(&pong) {
            kept += pong.len();
            assert!(kept <= MAX_CONTROL_BYTES, "{kept} bytes held");
        }
        assert_eq!(kept, MAX_CONTROL_BYTES);
        assert!(control.has_bytes());
        assert_eq!(control.take().len(), MAX_CONTROL_BYTES);
        assert!(!control.has_bytes());
        assert!(control.push(&pong), "taken: room again");
    }

    #[test]
    fn headers_take_the_shortest_length_that_fits() {
        assert_eq!(header(TEXT, 0), ([0x81, 0, 0, 0, 0, 0, 0, 0, 0, 0], 2));
        assert_eq!(header(TEXT, 125).0[..2], [0x81, 125]);
        assert_eq!(header(TEXT, 126).0[..4], [0x81, 126, 0, 126]);
        assert_eq!(header(TEXT, 0xFFFF).0[..4], [0x81, 126, 0xFF, 0xFF]);
        assert_eq!(
            header(CLOSE, 0x1_0000),
            ([0x88, 127, 0, 0, 0, 0, 0, 1, 0, 0], 10)
        );
        assert_eq!(header(PING, 0).0[..2], [0x89, 0]);
    }
}

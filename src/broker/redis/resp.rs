//! A plain RESP2 connection to Redis (or to one Cluster shard) for the subscriber task's
//! pub/sub connections.
//!
//! Commands are packed by `redis::Cmd`; replies and published messages are read with
//! `redis-protocol`'s range decoder straight out of one read buffer, which allocates one
//! vector per array reply and nothing else (redis-rs's pub/sub reader costs a driver task,
//! a value tree per message and a channel hop; BENCHMARKS.md has the profile).
//!
//! Each published payload is copied out of the read buffer (one small allocation) rather
//! than shared with it: a frame waiting in a slow reader's queue must not keep a whole read
//! buffer alive, or the queue's byte bound would not bound memory.

use std::fmt;
use std::ops::Range;

use bytes::{Buf, BytesMut};
use redis::ConnectionAddr;

use super::connect::RedisTarget;
use redis_protocol::resp2::decode::decode_range;
use redis_protocol::resp2::types::RangeFrame;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::error::BrokerError;

/// Read buffer size; it grows if a single frame is larger.
const READ_BUFFER: usize = 16 * 1024;

trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// A reply to a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Reply {
    /// `+OK` (to `AUTH`).
    Ok,
    /// A `subscribe` or `ssubscribe` confirmation (one per channel).
    Subscribed,
    /// An `unsubscribe` or `sunsubscribe` confirmation (one per channel), or, unasked, a
    /// cluster shard dropping a sharded subscription whose slot it no longer serves: the
    /// channel.
    Unsubscribed(Vec<u8>),
    /// The answer to `PING`.
    Pong,
    /// An error reply.
    Error(String),
}

/// One RESP2 pub/sub connection.
pub(super) struct RespConnection {
    io: Box<dyn Io>,
    buf: BytesMut,
}

impl fmt::Debug for RespConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RespConnection")
            .field("buffered", &self.buf.len())
            .finish_non_exhaustive()
    }
}

impl RespConnection {
    /// Connects (over TLS for `rediss://`) and authenticates (with the URL's user name and
    /// password, if any).
    pub(super) async fn connect(target: &RedisTarget) -> Result<Self, BrokerError> {
        let info = target.info();
        let io: Box<dyn Io> = match info.addr() {
            ConnectionAddr::Tcp(host, port) => {
                let stream = TcpStream::connect((host.as_str(), *port))
                    .await
                    .map_err(io_error)?;
                stream.set_nodelay(true).map_err(io_error)?;
                Box::new(stream)
            }
            #[cfg(unix)]
            ConnectionAddr::Unix(path) => Box::new(
                tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(io_error)?,
            ),
            #[cfg(feature = "tls")]
            ConnectionAddr::TcpTls { host, port, .. } => {
                let tls = target.tls().ok_or_else(|| {
                    BrokerError::connection(std::io::Error::other("no TLS settings for rediss://"))
                })?;
                let stream = TcpStream::connect((host.as_str(), *port))
                    .await
                    .map_err(io_error)?;
                stream.set_nodelay(true).map_err(io_error)?;
                Box::new(tls.connect(host, stream).await?)
            }
            _ => {
                return Err(BrokerError::connection(std::io::Error::new(
                    std::io::ErrorKind::Unsupported,
                    "this Redis address is not supported",
                )))
            }
        };
        let mut connection = RespConnection {
            io,
            buf: BytesMut::with_capacity(READ_BUFFER),
        };
        let settings = info.redis_settings();
        if let Some(password) = settings.password() {
            let mut auth = redis::cmd("AUTH");
            if let Some(user) = settings.username() {
                auth.arg(user);
            }
            auth.arg(password);
            connection.send(&auth).await?;
            match connection.next_reply(&mut |_: &[u8], _: &[u8]| {}).await? {
                Reply::Ok => {}
                Reply::Error(e) => return Err(refused(e)),
                other => return Err(unexpected(&other)),
            }
        }
        Ok(connection)
    }

    /// Writes one command.
    pub(super) async fn send(&mut self, command: &redis::Cmd) -> Result<(), BrokerError> {
        self.io
            .write_all(&command.get_packed_command())
            .await
            .map_err(io_error)
    }

    /// Reads until the next reply, handing every published message met on the way to
    /// `messages`, and [flushing](Messages::flush) it before each wait for bytes and before
    /// returning.
    ///
    /// Cancel-safe: a message is handed over at most once, and a reply is consumed only when
    /// it is returned.
    pub(super) async fn next_reply(
        &mut self,
        messages: &mut impl Messages,
    ) -> Result<Reply, BrokerError> {
        loop {
            loop {
                match self.decode_one(messages) {
                    Ok(None) => break,
                    Ok(Some(None)) => {}
                    Ok(Some(Some(reply))) => {
                        messages.flush();
                        return Ok(reply);
                    }
                    Err(e) => {
                        messages.flush();
                        return Err(e);
                    }
                }
            }
            messages.flush();
            if self.buf.capacity() - self.buf.len() < READ_BUFFER / 4 {
                self.buf.reserve(READ_BUFFER);
            }
            match self.io.read_buf(&mut self.buf).await {
                Ok(0) => {
                    return Err(BrokerError::connection(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "Redis closed the connection",
                    )))
                }
                Ok(_) => {}
                Err(e) => return Err(io_error(e)),
            }
        }
    }

    /// Waits for `count` replies that `expected` accepts, handing messages to `messages`
    /// and replies nobody asked for (a cluster master dropping a sharded subscription) to
    /// `unasked`, which says whether it took them; an error reply or any other reply is an
    /// error.
    pub(super) async fn expect(
        &mut self,
        count: usize,
        expected: impl Fn(&Reply) -> bool,
        mut unasked: impl FnMut(&Reply) -> bool,
        messages: &mut impl Messages,
    ) -> Result<(), BrokerError> {
        let mut left = count;
        while left > 0 {
            match self.next_reply(messages).await? {
                reply if expected(&reply) => left -= 1,
                reply if unasked(&reply) => {}
                Reply::Error(e) => return Err(refused(e)),
                other => return Err(unexpected(&other)),
            }
        }
        Ok(())
    }

    /// Decodes one frame from the buffer: `None` when it holds no complete frame,
    /// `Some(None)` for a message (handed to `messages`), `Some(Some(reply))` for a reply.
    fn decode_one(
        &mut self,
        messages: &mut impl Messages,
    ) -> Result<Option<Option<Reply>>, BrokerError> {
        let Some((event, used)) = decode(&self.buf, messages)? else {
            return Ok(None);
        };
        self.buf.advance(used);
        event.map(Some)
    }
}

/// Decodes the first frame of `buf`: `None` when it holds no complete frame, otherwise
/// what it is (see [`classify`]) and how many bytes it took. A published message, nearly
/// every frame a busy subscriber reads, is read by [`message_frame`] without the general
/// decoder (which allocates a vector for its three items).
fn decode(buf: &[u8], messages: &mut impl Messages) -> Result<Option<Decoded>, BrokerError> {
    if let Some(message) = message_frame(buf) {
        messages.message(&buf[message.channel], &buf[message.payload]);
        return Ok(Some((Ok(None), message.used)));
    }
    let Some((frame, used)) =
        decode_range(buf).map_err(|e| BrokerError::Protocol(format!("malformed: {e:?}")))?
    else {
        return Ok(None);
    };
    Ok(Some((classify(buf, &frame, messages), used)))
}

/// One decoded frame: what it is (see [`classify`]), and how many bytes it took.
type Decoded = (Result<Option<Reply>, BrokerError>, usize);

/// Where a published message's parts are in the read buffer.
struct MessageFrame {
    channel: Range<usize>,
    payload: Range<usize>,
    /// The bytes the whole frame takes.
    used: usize,
}

/// A complete published message at the start of `buf`,
/// `*3\r\n$7\r\nmessage\r\n$<n>\r\n<channel>\r\n$<m>\r\n<payload>\r\n` (or `smessage`): the
/// channel's and the payload's places and the bytes it takes. `None` for anything else,
/// complete or not, which the general decoder reads.
fn message_frame(buf: &[u8]) -> Option<MessageFrame> {
    const MESSAGE: &[u8] = b"*3\r\n$7\r\nmessage\r\n$";
    const SMESSAGE: &[u8] = b"*3\r\n$8\r\nsmessage\r\n$";
    let at = match buf {
        _ if buf.starts_with(MESSAGE) => MESSAGE.len(),
        _ if buf.starts_with(SMESSAGE) => SMESSAGE.len(),
        _ => return None,
    };
    let (channel, at) = bulk_string(buf, at)?;
    if buf.get(at) != Some(&b'$') {
        return None;
    }
    let (payload, used) = bulk_string(buf, at + 1)?;
    Some(MessageFrame {
        channel,
        payload,
        used,
    })
}

/// The bulk string whose length starts at `at` (just past its `$`): where its bytes are and
/// where the next frame starts; `None` if it is not all in `buf` or is not a bulk string.
fn bulk_string(buf: &[u8], at: usize) -> Option<(Range<usize>, usize)> {
    let digits = buf.get(at..)?;
    let end = memchr::memchr(b'\r', digits)?;
    let digits = &digits[..end];
    // At most 10 digits: a length past 4 GiB is not a frame to read here.
    if digits.is_empty() || digits.len() > 10 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let len = digits.iter().try_fold(0usize, |n, d| {
        n.checked_mul(10)?.checked_add(usize::from(d - b'0'))
    })?;
    let start = at + end + 2;
    if buf.get(start - 1) != Some(&b'\n') {
        return None;
    }
    let stop = start.checked_add(len)?;
    (buf.get(stop..stop + 2)? == b"\r\n").then_some((start..stop, stop + 2))
}

/// Where the messages published to the channels a connection subscribes go.
pub(super) trait Messages {
    /// A message published on `channel`.
    fn message(&mut self, channel: &[u8], payload: &[u8]);
    /// Called whenever the connection stops handing over messages (to wait for bytes, or to
    /// return a reply or an error): whatever was kept back must go on now.
    fn flush(&mut self) {}
}

impl<F: FnMut(&[u8], &[u8])> Messages for F {
    fn message(&mut self, channel: &[u8], payload: &[u8]) {
        self(channel, payload)
    }
}

/// Interprets one decoded frame.
fn classify(
    buf: &[u8],
    frame: &RangeFrame,
    messages: &mut impl Messages,
) -> Result<Option<Reply>, BrokerError> {
    let bytes = |(start, end): (usize, usize)| buf.get(start..end).unwrap_or_default();
    match frame {
        RangeFrame::SimpleString(range) => match bytes(*range) {
            b"OK" => Ok(Some(Reply::Ok)),
            b"PONG" => Ok(Some(Reply::Pong)),
            other => Err(BrokerError::Protocol(format!(
                "{}",
                String::from_utf8_lossy(other)
            ))),
        },
        RangeFrame::Error(range) => Ok(Some(Reply::Error(
            String::from_utf8_lossy(bytes(*range)).into_owned(),
        ))),
        RangeFrame::Array(items) => {
            let Some(RangeFrame::BulkString(kind)) = items.first() else {
                return Err(BrokerError::Protocol("an array not led by a kind".into()));
            };
            match (bytes(*kind), items.get(1), items.get(2)) {
                (
                    b"message" | b"smessage",
                    Some(RangeFrame::BulkString(channel)),
                    Some(RangeFrame::BulkString(payload)),
                ) => {
                    messages.message(bytes(*channel), bytes(*payload));
                    Ok(None)
                }
                (b"subscribe" | b"ssubscribe", _, _) => Ok(Some(Reply::Subscribed)),
                (b"unsubscribe" | b"sunsubscribe", channel, _) => {
                    let channel = match channel {
                        Some(RangeFrame::BulkString(channel)) => bytes(*channel).to_vec(),
                        _ => Vec::new(),
                    };
                    Ok(Some(Reply::Unsubscribed(channel)))
                }
                (b"pong", _, _) => Ok(Some(Reply::Pong)),
                (other, _, _) => Err(BrokerError::Protocol(format!(
                    "a push of kind {}",
                    String::from_utf8_lossy(other)
                ))),
            }
        }
        other => Err(BrokerError::Protocol(format!("{other:?}"))),
    }
}

/// An error reply from Redis.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct ErrorReply(String);

fn refused(reply: String) -> BrokerError {
    BrokerError::Refused(std::sync::Arc::new(ErrorReply(reply)))
}

fn unexpected(reply: &Reply) -> BrokerError {
    BrokerError::Protocol(format!("{reply:?}"))
}

fn io_error(e: std::io::Error) -> BrokerError {
    BrokerError::connection(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8]) -> (Vec<Reply>, Vec<(String, String)>) {
        let mut buf = BytesMut::from(input);
        let mut replies = Vec::new();
        let mut messages = Vec::new();
        while let Some((reply, used)) = decode(&buf, &mut |c: &[u8], p: &[u8]| {
            messages.push((
                String::from_utf8_lossy(c).into_owned(),
                String::from_utf8_lossy(p).into_owned(),
            ))
        })
        .unwrap()
        {
            replies.extend(reply.unwrap());
            buf.advance(used);
        }
        assert!(buf.is_empty(), "a partial frame was left: {buf:?}");
        (replies, messages)
    }

    #[test]
    fn messages_and_replies_are_told_apart() {
        let input = b"*3\r\n$9\r\nsubscribe\r\n$6\r\nroom:a\r\n:1\r\n\
            *3\r\n$7\r\nmessage\r\n$6\r\nroom:a\r\n$5\r\nhello\r\n\
            *2\r\n$4\r\npong\r\n$0\r\n\r\n\
            *3\r\n$11\r\nunsubscribe\r\n$6\r\nroom:a\r\n:0\r\n\
            +PONG\r\n+OK\r\n-ERR nope\r\n\
            *3\r\n$10\r\nssubscribe\r\n$6\r\nroom:b\r\n:1\r\n\
            *3\r\n$8\r\nsmessage\r\n$6\r\nroom:b\r\n$2\r\nhi\r\n\
            *3\r\n$12\r\nsunsubscribe\r\n$6\r\nroom:b\r\n:0\r\n";
        let (replies, messages) = decode_all(input);
        assert_eq!(
            replies,
            [
                Reply::Subscribed,
                Reply::Pong,
                Reply::Unsubscribed(b"room:a".to_vec()),
                Reply::Pong,
                Reply::Ok,
                Reply::Error("ERR nope".into()),
                Reply::Subscribed,
                Reply::Unsubscribed(b"room:b".to_vec()),
            ]
        );
        let messages: Vec<(&str, &str)> = messages
            .iter()
            .map(|(c, p)| (c.as_str(), p.as_str()))
            .collect();
        assert_eq!(messages, [("room:a", "hello"), ("room:b", "hi")]);
    }

    #[test]
    fn a_partial_frame_waits_for_more_bytes() {
        let full = b"*3\r\n$7\r\nmessage\r\n$1\r\nr\r\n$5\r\nhello\r\n";
        for cut in 1..full.len() {
            assert!(message_frame(&full[..cut]).is_none(), "cut at {cut}");
            let decoded = decode(&full[..cut], &mut |_: &[u8], _: &[u8]| panic!("a message"));
            assert!(decoded.unwrap().is_none(), "cut at {cut}");
        }
    }

    #[test]
    fn the_message_fast_path_reads_what_the_general_decoder_reads() {
        let mut buf = Vec::new();
        let mut expected = Vec::new();
        for (kind, channel, payload) in [
            ("message", "r", "x"),
            ("smessage", "{room}:b", ""),
            ("message", "a\r\nb", "$3\r\n*3\r\n"),
            ("message", "c", &"p".repeat(70_000)),
        ] {
            buf.extend_from_slice(format!("*3\r\n${}\r\n{kind}\r\n", kind.len()).as_bytes());
            for part in [channel, payload] {
                buf.extend_from_slice(format!("${}\r\n{part}\r\n", part.len()).as_bytes());
            }
            expected.push((channel.to_string(), payload.to_string()));
        }
        assert!(message_frame(&buf).is_some());
        let (replies, messages) = decode_all(&buf);
        assert!(replies.is_empty());
        assert_eq!(messages, expected);
        // Frames it does not take: a null payload, a length that is not digits, a wrong
        // terminator, a fourth item; each left to the general decoder.
        for input in [
            &b"*3\r\n$7\r\nmessage\r\n$1\r\nr\r\n$-1\r\n"[..],
            b"*3\r\n$7\r\nmessage\r\n$x\r\nr\r\n$1\r\nx\r\n",
            b"*3\r\n$7\r\nmessage\r\n$1\r\nr\r\n$1\r\nxx\r\n",
            b"*4\r\n$7\r\nmessage\r\n$1\r\nr\r\n$1\r\nx\r\n$1\r\ny\r\n",
        ] {
            assert!(message_frame(input).is_none(), "{input:?}");
        }
    }

    proptest::proptest! {
        /// Whatever the fast path takes, the general decoder reads the same way: the same
        /// length, channel and payload. Frames are published messages with any bytes, some
        /// with one byte of their framing changed, cut anywhere.
        #[test]
        fn the_fast_path_takes_only_what_the_general_decoder_reads_alike(
            smessage in proptest::bool::ANY,
            channel in proptest::collection::vec(proptest::num::u8::ANY, 0..40),
            payload in proptest::collection::vec(proptest::num::u8::ANY, 0..300),
            change in proptest::option::of((0usize..40, proptest::num::u8::ANY)),
            cut in 0usize..400,
        ) {
            let kind: &[u8] = if smessage { b"smessage" } else { b"message" };
            let mut frame = format!("*3\r\n${}\r\n", kind.len()).into_bytes();
            frame.extend_from_slice(kind);
            for part in [&channel, &payload] {
                frame.extend_from_slice(format!("\r\n${}\r\n", part.len()).as_bytes());
                frame.extend_from_slice(part);
            }
            frame.extend_from_slice(b"\r\n");
            if let Some((at, byte)) = change {
                let at = at % frame.len();
                frame[at] = byte;
            }
            let buf = &frame[..cut.min(frame.len())];
            if let Some(fast) = message_frame(buf) {
                let (general, used) = decode_range(buf).unwrap().expect("a whole frame");
                proptest::prop_assert_eq!(used, fast.used);
                let mut seen = Vec::new();
                let reply = classify(buf, &general, &mut |c: &[u8], p: &[u8]| {
                    seen.push((c.to_vec(), p.to_vec()))
                });
                proptest::prop_assert!(matches!(reply, Ok(None)));
                let read = (buf[fast.channel].to_vec(), buf[fast.payload].to_vec());
                proptest::prop_assert_eq!(seen, vec![read]);
            }
            if change.is_none() {
                proptest::prop_assert_eq!(message_frame(buf).is_some(), buf.len() == frame.len());
            }
        }
    }

    #[test]
    fn unexpected_frames_are_errors_not_panics() {
        // An integer too: nothing the subscriber sends is answered with one.
        for input in [
            &b"*1\r\n:1\r\n"[..],
            b"*1\r\n$3\r\nfoo\r\n",
            b"+HUH\r\n",
            b":2\r\n",
        ] {
            let buf = BytesMut::from(input);
            let (frame, _) = decode_range(&buf).unwrap().unwrap();
            assert!(classify(&buf, &frame, &mut |_: &[u8], _: &[u8]| {}).is_err());
        }
    }
}

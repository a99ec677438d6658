//! The accept loop: connections that have not upgraded yet are bounded in number and in
//! how long their request head may take, accept errors back off instead of spinning, and
//! the socket limit leaves room under the process's open-file limit.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// File descriptors kept free for everything but sockets: Redis connections, the listener,
/// logs, the occasional HTTP request.
const RESERVED_FDS: usize = 64;

/// What the open-file limit allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// The open-file limit in force (after raising the soft limit as far as allowed).
    pub open_files: usize,
    /// Sockets the node accepts (`--max-sockets`, capped so that the 503 comes first).
    pub sockets: usize,
    /// Connections that may wait for their request head or upgrade at once.
    pub pending: usize,
}

/// Raises the soft open-file limit to the hard one, then fits the socket and pending limits
/// under it with [`RESERVED_FDS`] to spare.
pub fn capacity(max_sockets: usize, max_pending: usize) -> Capacity {
    let open_files = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => usize::try_from(limit).unwrap_or(usize::MAX),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read or raise the open-file limit");
            usize::MAX
        }
    };
    fit(open_files, max_sockets, max_pending)
}

/// The limits that fit `open_files`: pending connections take at most a quarter of it,
/// sockets the rest but [`RESERVED_FDS`].
fn fit(open_files: usize, max_sockets: usize, max_pending: usize) -> Capacity {
    let pending = max_pending.min(open_files / 4).max(1);
    let sockets = max_sockets.min(
        open_files
            .saturating_sub(pending)
            .saturating_sub(RESERVED_FDS)
            .max(1),
    );
    Capacity {
        open_files,
        sockets,
        pending,
    }
}

/// Accepts connections until `shutdown` resolves, handing each to `serve` with a permit
/// that it holds until the connection upgrades or ends: at most `pending` connections wait
/// for their request head or upgrade at once, and the rest wait in the listen backlog.
pub async fn accept_loop(
    listener: TcpListener,
    pending: usize,
    shutdown: impl Future<Output = ()>,
    mut serve: impl FnMut(TcpStream, OwnedSemaphorePermit),
) {
    let permits = Arc::new(Semaphore::new(pending));
    let mut errors = AcceptErrors::default();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => return,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                // The semaphore is never closed.
                Err(_) => return,
            },
        };
        let accepted = tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((tcp, _)) => {
                errors.succeeded();
                let _ = tcp.set_nodelay(true);
                serve(tcp, permit);
            }
            Err(e) => {
                drop(permit);
                let (pause, log) = errors.failed(&e, Instant::now());
                if let Some(suppressed) = log {
                    tracing::warn!(error = %e, suppressed, retry_in = ?pause, "accept failed");
                }
                tokio::select! {
                    () = &mut shutdown => return,
                    () = tokio::time::sleep(pause) => {}
                }
            }
        }
    }
}

/// Backs off after accept errors and logs them at most once a second.
#[derive(Debug)]
pub struct AcceptErrors {
    delay: Duration,
    last_log: Option<Instant>,
    suppressed: u64,
}

/// The first pause after an accept error; it doubles up to [`MAX_DELAY`].
const MIN_DELAY: Duration = Duration::from_millis(5);
const MAX_DELAY: Duration = Duration::from_secs(1);

impl Default for AcceptErrors {
    fn default() -> Self {
        AcceptErrors {
            delay: MIN_DELAY,
            last_log: None,
            suppressed: 0,
        }
    }
}

impl AcceptErrors {
    /// An accept succeeded: the next error starts the backoff afresh.
    pub fn succeeded(&mut self) {
        self.delay = MIN_DELAY;
    }

    /// Records an accept error at `now`; returns how long to pause before accepting again
    /// (zero for errors that concern one connection only) and whether to log it, with how
    /// many errors went unlogged before it.
    pub fn failed(&mut self, e: &io::Error, now: Instant) -> (Duration, Option<u64>) {
        // The peer gave up between SYN and accept: nothing is wrong with the listener.
        let per_connection = matches!(
            e.kind(),
            io::ErrorKind::ConnectionAborted
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionRefused
        );
        let log = match self.last_log {
            Some(last) if now.duration_since(last) < Duration::from_secs(1) => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last_log = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        };
        if per_connection {
            return (Duration::ZERO, log);
        }
        let delay = self.delay;
        self.delay = (self.delay * 2).min(MAX_DELAY);
        (delay, log)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_fit_under_the_open_file_limit() {
        // This workplace: 20,000 open files; the default 100,000 sockets would never 503.
        let c = fit(20_000, 100_000, 1024);
        assert_eq!(c.pending, 1024);
        assert_eq!(c.sockets, 20_000 - 1024 - RESERVED_FDS);
        let small = fit(128, 100_000, 1024);
        assert_eq!(small.pending, 32);
        assert_eq!(small.sockets, 128 - 32 - RESERVED_FDS);
        assert_eq!(
            fit(1_000_000, 500, 10).sockets,
            500,
            "a lower setting stays"
        );
    }

    #[test]
    fn errors_back_off_and_are_logged_once_a_second() {
        let mut errors = AcceptErrors::default();
        let emfile = io::Error::from_raw_os_error(24);
        let t0 = Instant::now();
        let (d1, log1) = errors.failed(&emfile, t0);
        let (d2, log2) = errors.failed(&emfile, t0 + Duration::from_millis(10));
        let (d3, log3) = errors.failed(&emfile, t0 + Duration::from_millis(20));
        assert_eq!((d1, log1), (MIN_DELAY, Some(0)));
        assert_eq!((d2, log2), (MIN_DELAY * 2, None));
        assert_eq!((d3, log3), (MIN_DELAY * 4, None));
        for n in 0..20 {
            errors.failed(&emfile, t0 + Duration::from_millis(30 + n));
        }
        let (d, log) = errors.failed(&emfile, t0 + Duration::from_millis(1_100));
        assert_eq!(d, MAX_DELAY);
        assert_eq!(log, Some(22), "the unlogged ones are counted");
        errors.succeeded();
        let aborted = io::Error::from(io::ErrorKind::ConnectionAborted);
        assert_eq!(
            errors.failed(&aborted, t0 + Duration::from_secs(3)).0,
            Duration::ZERO
        );
        assert_eq!(
            errors.failed(&emfile, t0 + Duration::from_secs(3)).0,
            MIN_DELAY
        );
    }
}

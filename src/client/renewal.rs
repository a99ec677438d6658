//! Keeping a socket's credential fresh: when the server says how long the socket's token
//! lasts (`expiresIn` in the `connect` ack), the client asks its token provider for a new
//! one ahead of time and sends `refresh`, so the socket is never closed for an expired
//! token while it is in use.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::{ClientError, TokenSource};
use crate::protocol::server::{self, ServerFrame};
use crate::protocol::ErrorCode;

/// How long after a failed renewal (the provider failed, or the server refused the token)
/// the client tries again, while the socket lasts.
const RETRY: Duration = Duration::from_secs(5);

type Fetching = Pin<Box<dyn Future<Output = Result<String, ClientError>> + Send>>;

/// Where the renewal of one connection's credential stands.
pub(super) struct Renewal {
    /// The token provider; `None` for a fixed token (nothing to renew with).
    provider: Option<TokenSource>,
    state: State,
}

enum State {
    /// Nothing to renew (no deadline, or no provider).
    Idle,
    /// Renew at this instant.
    At(Instant),
    /// Asking the provider.
    Fetching(Fetching),
    /// `refresh` sent: waiting for the server's answer.
    Sent(oneshot::Receiver<Result<String, ClientError>>),
}

impl Renewal {
    /// The renewal of a connection whose `connect` ack said `expires_in`.
    pub(super) fn new(token: Option<&TokenSource>, expires_in: Option<Duration>) -> Self {
        let provider = token.filter(|t| matches!(t, TokenSource::Provider(_)));
        let mut renewal = Renewal {
            provider: provider.cloned(),
            state: State::Idle,
        };
        renewal.schedule(expires_in);
        renewal
    }

    /// Renews at three quarters of `expires_in` (never, for one too far off to count).
    fn schedule(&mut self, expires_in: Option<Duration>) {
        let at = |left: Duration| Instant::now().checked_add(left.checked_mul(3)? / 4);
        self.state = match (&self.provider, expires_in.and_then(at)) {
            (Some(_), Some(at)) => State::At(at),
            _ => State::Idle,
        };
    }

    /// Resolves with a fresh token to send in a `refresh` (never, while nothing is due).
    /// Cancel-safe: what it has done so far is kept in `self`.
    pub(super) async fn token(&mut self) -> String {
        loop {
            match &mut self.state {
                State::Idle => std::future::pending::<()>().await,
                State::At(at) => {
                    tokio::time::sleep_until(*at).await;
                    let Some(provider) = self.provider.clone() else {
                        self.state = State::Idle;
                        continue;
                    };
                    self.state = State::Fetching(Box::pin(async move { provider.get().await }));
                }
                State::Fetching(fetching) => match fetching.await {
                    Ok(token) => {
                        self.state = State::Idle;
                        return token;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "the token provider failed; trying again");
                        self.state = State::At(Instant::now() + RETRY);
                    }
                },
                State::Sent(answer) => {
                    let answer = answer.await;
                    match answer {
                        Ok(Ok(ack)) => {
                            let expires_in = match server::parse(&ack) {
                                Ok(ServerFrame::Ack { expires_in, .. }) => expires_in,
                                _ => None,
                            };
                            self.schedule(expires_in.map(Duration::from_secs));
                        }
                        Ok(Err(ClientError::Disconnected)) | Err(_) => self.state = State::Idle,
                        // The server does not renew credentials, or never will this one's
                        // (another identity): trying again would not help.
                        Ok(Err(e))
                            if matches!(
                                e.code(),
                                Some(ErrorCode::NotEnabled | ErrorCode::InvalidMessage)
                            ) =>
                        {
                            tracing::warn!(error = %e, "the server will not renew this socket's credential; it closes at its deadline");
                            self.state = State::Idle;
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "the server refused the new token; trying again");
                            self.state = State::At(Instant::now() + RETRY);
                        }
                    }
                }
            }
        }
    }

    /// The `refresh` with the token from [`Renewal::token`] was sent; `answer` gets its ack
    /// or error.
    pub(super) fn sent(&mut self, answer: oneshot::Receiver<Result<String, ClientError>>) {
        self.state = State::Sent(answer);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn provider() -> TokenSource {
        TokenSource::Provider(Arc::new(|| Box::pin(async { Ok("t".to_owned()) })))
    }

    #[tokio::test]
    async fn a_deadline_too_far_off_to_count_is_never_renewed() {
        // A server's `expiresIn` of u64::MAX seconds: no overflow, no renewal.
        let renewal = Renewal::new(Some(&provider()), Some(Duration::from_secs(u64::MAX)));
        assert!(matches!(renewal.state, State::Idle));
        let renewal = Renewal::new(Some(&provider()), Some(Duration::from_secs(60)));
        assert!(matches!(renewal.state, State::At(_)));
    }
}

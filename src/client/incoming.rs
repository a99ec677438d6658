//! What the server's frames do to the client: deliveries go to the stream, answers settle
//! the requests in flight (and what the client holds), gaps and presence events go to
//! their callbacks.

use std::borrow::Cow;
use std::collections::HashMap;

use tokio::sync::mpsc;

use super::held::Held;
use super::open::{answered, server_error};
use super::outbox::{resend_after, Outgoing, Retries};
use super::{ClientBuilder, ClientError, Delivery, Gap, Member, Reply};
use crate::protocol::server::{self, ServerFrame};

/// What a request in flight changes in what the client holds when it is answered.
pub(super) enum Pending {
    Other,
    /// A message: sent again if its outcome stays unknown.
    Message(Outgoing),
    Subscribe(String),
    Unsubscribe(String),
    /// A room the server had lost, subscribed again.
    Resubscribe(String),
}

pub(super) type InFlight = HashMap<u64, (Reply, Pending)>;

/// Why a connected session ended.
pub(super) enum End {
    Lost,
    /// The server closed the socket over a frame it could not take (too large, not
    /// UTF-8, a protocol error): it answers no frame after that one, so the messages in
    /// flight are not sent again (one of them is the cause).
    Refused,
    Closed,
}

/// Handles one text frame from the server: a delivery, an answer to a request in flight,
/// a gap or a presence event. `Some` ends the session.
pub(super) async fn on_text(
    text: &str,
    config: &ClientBuilder,
    held: &mut Held,
    deliveries: &mpsc::Sender<Delivery>,
    in_flight: &mut InFlight,
    retries: &mut Retries,
) -> Option<End> {
    match server::parse(text) {
        Ok(ServerFrame::Message {
            room,
            connection_id,
            payload,
            offset,
            epoch,
        }) => {
            if let (Some(offset), Some(epoch)) = (offset, &epoch) {
                // Seen already (recovery may resend what arrived live).
                if !held.advance(&room, offset, epoch) {
                    return None;
                }
            }
            let Ok(payload) = serde_json::from_str(payload.get()) else {
                tracing::debug!(%room, "dropped a delivery whose payload this client cannot read");
                return None;
            };
            let delivery = Delivery {
                room: room.into_owned(),
                sender: connection_id.map(Cow::into_owned),
                payload,
                offset,
                epoch: epoch.map(Cow::into_owned),
            };
            // Nobody reads the stream any more: drop deliveries.
            let _ = deliveries.send(delivery).await;
        }
        Ok(ServerFrame::Ack {
            message_id,
            offset,
            epoch,
            recovered,
            ..
        }) => {
            if let Some((reply, pending)) =
                answered(Some(message_id)).and_then(|id| in_flight.remove(&id))
            {
                if let Pending::Message(_) = pending {
                    retries.acked();
                }
                let at = offset.zip(epoch.map(Cow::into_owned));
                acked(config, held, pending, at, recovered);
                let _ = reply.send(Ok(text.to_owned()));
            }
        }
        Ok(ServerFrame::Error {
            message_id,
            code,
            message,
        }) => {
            if let Some((reply, pending)) =
                answered(message_id).and_then(|id| in_flight.remove(&id))
            {
                let pending = match pending {
                    Pending::Message(mut outgoing) if resend_after(&code) => {
                        tracing::debug!(room = outgoing.room, code = %code, "sending a message again");
                        outgoing.maybe_published |= code == "timeout";
                        retries.later(outgoing, reply);
                        return None;
                    }
                    Pending::Message(outgoing) if outgoing.maybe_published => {
                        // This send was refused; an earlier one may have gone out.
                        let _ = reply.send(Err(ClientError::Unsettled {
                            code: code.parse().ok(),
                            message: message.to_string(),
                        }));
                        return None;
                    }
                    pending => pending,
                };
                if let Pending::Resubscribe(room) = pending {
                    if code == "unavailable" || code == "timeout" {
                        // Redis is struggling: reconnect, and try again then.
                        tracing::debug!(room, code = %code, "could not subscribe again yet; reconnecting");
                        return Some(End::Lost);
                    }
                    tracing::warn!(room, code = %code, message = %message, "a room the server lost could not be subscribed again");
                    held.left(&room);
                    config.gap(Gap {
                        room,
                        offset: None,
                        epoch: None,
                    });
                }
                let _ = reply.send(Err(server_error(&code, &message)));
            }
        }
        Ok(ServerFrame::Gap {
            room,
            offset,
            epoch,
        }) => {
            if let (Some(offset), Some(epoch)) = (offset, &epoch) {
                held.jump(&room, offset, epoch);
            }
            config.gap(Gap {
                room: room.into_owned(),
                offset,
                epoch: epoch.map(Cow::into_owned),
            });
        }
        Ok(ServerFrame::Join {
            room,
            connection_id,
        }) => config.presence_event(
            true,
            Member {
                room: room.into_owned(),
                connection_id: connection_id.into_owned(),
            },
        ),
        Ok(ServerFrame::Leave {
            room,
            connection_id,
        }) => config.presence_event(
            false,
            Member {
                room: room.into_owned(),
                connection_id: connection_id.into_owned(),
            },
        ),
        Ok(_) => {}
        Err(e) => tracing::debug!(error = %e, "ignored an unreadable frame from the server"),
    }
    None
}

/// What an answered request changes in what the client holds.
fn acked(
    config: &ClientBuilder,
    held: &mut Held,
    pending: Pending,
    at: Option<(u64, String)>,
    recovered: Option<bool>,
) {
    match pending {
        Pending::Other | Pending::Message(_) => {}
        Pending::Subscribe(room) => held.subscribed(room, at),
        Pending::Unsubscribe(room) => held.left(&room),
        Pending::Resubscribe(room) => {
            // Messages published while the server had lost the room may be missing,
            // unless its history gave them all back.
            if recovered != Some(true) {
                let (offset, epoch) = at.clone().unzip();
                if let Some((offset, epoch)) = &at {
                    held.jump(&room, *offset, epoch);
                }
                config.gap(Gap {
                    room: room.clone(),
                    offset,
                    epoch,
                });
            }
            held.subscribed(room, at);
        }
    }
}

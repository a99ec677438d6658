//! `history` on the client: a room's kept messages, asked for page by page (each reply
//! stays within the server's byte budget and says `more` when older ones are left).

use serde_json::value::RawValue;

use super::{ClientError, Delivery, HistoryPage, Op, ThinWsClient};

/// One page of a `history` reply.
struct Page {
    history: HistoryPage,
    /// Older messages are left.
    more: bool,
}

impl ThinWsClient {
    /// The last `limit` messages a room with history keeps (all it keeps when `None`),
    /// oldest first: what a chat shows on join. The server sends a long history in pages
    /// (each within its byte budget); this asks for them all. A room without history
    /// answers [`ErrorCode::NotEnabled`](crate::protocol::ErrorCode::NotEnabled).
    pub async fn history(
        &self,
        room: impl Into<String>,
        limit: Option<u64>,
    ) -> Result<HistoryPage, ClientError> {
        let room = room.into();
        let mut page = self.history_page(&room, limit, None).await?;
        let mut more = page.more;
        while more {
            let got = page.history.messages.len() as u64;
            let wanted = limit.map(|limit| limit.saturating_sub(got));
            let before = page.history.messages.first().and_then(|m| m.offset);
            let (Some(before), false) = (before, wanted == Some(0)) else {
                break;
            };
            let mut earlier = self.history_page(&room, wanted, Some(before)).await?;
            // A history recreated meanwhile (another epoch) does not continue this one.
            if earlier.history.epoch != page.history.epoch {
                break;
            }
            earlier.history.messages.append(&mut page.history.messages);
            page.history.messages = earlier.history.messages;
            more = earlier.more;
        }
        Ok(page.history)
    }

    /// One page of a room's history: up to `limit` messages before `before`.
    async fn history_page(
        &self,
        room: &str,
        limit: Option<u64>,
        before: Option<u64>,
    ) -> Result<Page, ClientError> {
        let ack = self
            .request(Op::History(room.to_owned(), limit, before))
            .await?;
        let unreadable = || ClientError::Protocol(format!("unreadable history: {ack}"));
        let Ok(crate::protocol::server::ServerFrame::Ack {
            offset: Some(offset),
            epoch: Some(epoch),
            messages: Some(messages),
            more,
            ..
        }) = crate::protocol::server::parse(&ack)
        else {
            return Err(unreadable());
        };
        let frames: Vec<&RawValue> =
            serde_json::from_str(messages.get()).map_err(|_| unreadable())?;
        let mut out = Vec::with_capacity(frames.len());
        for frame in frames {
            if let Ok(crate::protocol::server::ServerFrame::Message {
                room,
                connection_id,
                payload,
                offset,
                epoch,
            }) = crate::protocol::server::parse(frame.get())
            {
                out.push(Delivery {
                    room: room.into_owned(),
                    sender: connection_id.map(|id| id.into_owned()),
                    payload: serde_json::from_str(payload.get()).map_err(|_| unreadable())?,
                    offset,
                    epoch: epoch.map(|e| e.into_owned()),
                });
            }
        }
        Ok(Page {
            history: HistoryPage {
                offset,
                epoch: epoch.into_owned(),
                messages: out,
            },
            more: more == Some(true),
        })
    }
}

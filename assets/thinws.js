/*
 * thinws.js: the ThinWS browser client. No dependencies.
 *
 * As a plain script:  <script src="/thinws.js"></script>   (defines ThinWSClient, ThinWSError)
 * As an ES module:    import { ThinWSClient } from "/thinws.mjs";
 *
 *   const client = new ThinWSClient("ws://host/", "alice", (msg) => {
 *     console.log(msg.connectionID, "in", msg.roomID, "says", msg.payload);
 *   }, (client) => console.log("connected"));
 *   await client.subscribe("lobby");          // resolves on the server's ack
 *   await client.send({ text: "hi" }, "lobby"); // rejects with a ThinWSError on an error frame
 *
 * The API shape is the original ThinWS client's (constructor, subscribe, unsubscribe,
 * send(payload, roomID), disconnect), plus promises. The client reconnects on its own with
 * exponential backoff and jitter and sends `connect` again, so the server rejoins the
 * identity's rooms; onOpen runs after every (re)connection. Requests made while
 * disconnected are queued (up to options.maxQueue) and sent after reconnecting.
 *
 * send() publishes exactly once (protocol 1.2): each message carries an idempotency key and
 * stays in the client's outbox until acked. It is sent again with the same key when the
 * server answers "timeout" (the outcome is unknown) or "unavailable" (after a pause of
 * 100 ms, doubling up to 2 s), and after a reconnection when the connection dropped first
 * (in the order first sent, before anything new); the server publishes a key at most once
 * within its window (2 minutes by default). send() rejects only on a definite error
 * ("forbidden", "invalid_*", "too_large", "rate_limited": nothing was published), a full
 * queue ("queue_full"), or its deadline (options.timeout: "timeout", the outcome is unknown,
 * and the message is not sent again); "unsettled" when it was refused on a resend after a
 * send that may have been published (the outcome is unknown). Other requests already sent when the connection
 * dropped reject with code "disconnected"; their error frames are never retried.
 *
 * options: { minDelay: 250, maxDelay: 10000 (ms, the backoff), timeout: 10000 (ms per
 * request), maxQueue: 1000, onClose(client) (called when a connection drops), token (a string,
 * or a function returning a string or a promise of one, called before every connect: a
 * signed token for a server that requires one; as a function, it is also asked for a new
 * token before the current one expires, which is sent in a `refresh`), onGap(gap) (messages
 * of a room may have been missed and could not be recovered: { roomID, offset, epoch } for a
 * history room, { roomID } when the server lost Redis: refetch what you show), onJoin(event) and
 * onLeave(event) ({ roomID, connectionID }: an identity's first socket joined, or its last
 * left, a room with join/leave events, on any node) }
 *
 * History rooms (protocol 1.1): the client remembers the last offset of each, sends it with
 * every connect so that the server sends what was missed, and drops messages it already
 * had; history(roomID, limit) returns the last messages a room keeps.
 *
 * Presence rooms (protocol 1.1): presence(roomID) resolves to { count, members }, who is in
 * the room on every node.
 */
(function (global) {
  "use strict";

  class ThinWSError extends Error {
    constructor(code, message, messageID) {
      super(code + ": " + message);
      this.name = "ThinWSError";
      this.code = code;
      this.messageID = messageID;
    }
  }

  // Error codes after which a message is sent again (its outcome is unknown, or nothing
  // was published), and close codes with which a server refuses a frame (RFC 6455: 1002
  // protocol error, 1003 unacceptable data, 1007 not UTF-8, 1009 too big).
  const RESEND_AFTER = new Set(["timeout", "unavailable"]);
  const REFUSED_A_FRAME = new Set([1002, 1003, 1007, 1009]);
  // The longest delay setTimeout takes: browsers fire a longer one at once.
  const MAX_TIMER = 2 ** 31 - 1;

  // Runs an application callback; one that throws is reported and does not stop the
  // client (a throw in the middle of a connect would leave it half connected).
  function safely(callback, ...args) {
    if (!callback) return;
    try {
      callback(...args);
    } catch (error) {
      setTimeout(() => {
        throw error;
      });
    }
  }

  function randomHex(bytes) {
    const values = new Uint8Array(bytes);
    if (global.crypto && global.crypto.getRandomValues) global.crypto.getRandomValues(values);
    else for (let i = 0; i < bytes; i++) values[i] = Math.floor(Math.random() * 256);
    return Array.from(values, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  class ThinWSClient {
    constructor(url, connectionID, onMessage, onOpen, options) {
      this.url = url;
      this.connectionID = connectionID;
      this.onMessage = onMessage || function () {};
      this.onOpen = onOpen || function () {};
      this.options = Object.assign(
        { minDelay: 250, maxDelay: 10000, timeout: 10000, maxQueue: 1000 },
        options || {}
      );
      this.connected = false;
      this._nextID = 1;
      this._pending = new Map();
      this._queue = [];
      this._closed = false;
      this._attempt = 0;
      // The outbox (protocol 1.2): each message's key is this client's random prefix and a
      // count; messages answered "timeout" or "unavailable" wait in _retries for a pause.
      this._keyPrefix = randomHex(8);
      this._nextSeq = 0;
      this._retries = [];
      this._retryTimer = null;
      this._retryPause = 0;
      // History rooms (protocol 1.1): the last offset and epoch seen in each, sent with
      // every connect so that the server sends what was missed.
      this._positions = new Map();
      // The rooms this client subscribed to and has not left: after a reconnection, one the
      // server no longer lists (it lost the identity's record) is subscribed again.
      this._rooms = new Set();
      // Rooms whose unsubscribe was in flight when the connection dropped.
      this._leaving = new Set();
      this._open();
    }

    // Records a message at `offset`; false when it was seen already.
    _advance(roomID, offset, epoch) {
      const last = this._positions.get(roomID);
      if (last && last.epoch === epoch && offset <= last.offset) return false;
      this._positions.set(roomID, { offset, epoch });
      return true;
    }

    // Messages of a room may have been missed: in a history room up to `offset` (where it
    // goes on from), in any room when the server's node lost Redis (no offset then).
    _gap(gap) {
      if (typeof gap.offset === "number") {
        this._positions.set(gap.roomID, { offset: gap.offset, epoch: gap.epoch });
      }
      safely(this.options.onGap, gap);
    }

    _open() {
      const ws = new WebSocket(this.url);
      this.ws = ws;
      // The length of this socket's connect frame, once sent.
      let connectLength = 0;
      ws.onopen = () => {
        // options.token: a string, or a function returning one (or a promise of one), asked
        // again before every connect so that an expiring token can be renewed.
        const token = this.options.token;
        Promise.resolve(typeof token === "function" ? token() : token)
          .then((value) => {
            // A token slower than the socket: this one was replaced meanwhile.
            if (this.ws !== ws) return null;
            const frame = { type: "connect", connectionID: this.connectionID };
            if (value) frame.token = value;
            // `since` (even empty) makes the ack list the rooms the server rejoined.
            if (this._positions.size > 0 || this._rooms.size > 0) {
              frame.since = Object.fromEntries(this._positions);
              // As long as one the server refused as too large (closed with 1009): without
              // the positions, and each history room that missed messages is told a gap
              // instead of recovered. For this connect only: another server may take them.
              const refused = this._refusedLength;
              this._refusedLength = undefined;
              if (refused !== undefined && this._positions.size > 0 &&
                  JSON.stringify(frame).length >= refused) {
                frame.since = {};
              }
            }
            connectLength = JSON.stringify(frame).length;
            return this._send(frame);
          })
          .then(
            (ack) => {
              if (this.ws !== ws || !ack) return;
              // Rooms the server could not recover are gaps; rooms it no longer lists are
              // subscribed again, unless their unsubscribe was in flight when the last
              // connection dropped (the server applied it).
              const leaving = this._leaving;
              this._leaving = new Set();
              if (ack.rooms) {
                for (const roomID of this._rooms) {
                  // Own keys only: a room named "constructor" is not in every object.
                  if (Object.prototype.hasOwnProperty.call(ack.rooms, roomID)) continue;
                  if (leaving.has(roomID)) {
                    this._rooms.delete(roomID);
                    this._positions.delete(roomID);
                  } else this._resubscribe(roomID);
                }
                for (const [roomID, room] of Object.entries(ack.rooms)) {
                  const held = this._rooms.has(roomID);
                  this._rooms.add(roomID);
                  const at = this._positions.get(roomID);
                  if (typeof room.offset !== "number") {
                    // A room without history this client held: what was published while
                    // it was away is gone, and the application is told so.
                    if (held) this._gap({ type: "gap", roomID });
                  } else if (room.recovered === false || (room.recovered === undefined && held &&
                      !(at && at.offset === room.offset && at.epoch === room.epoch))) {
                    // Not recovered, or held and not asked to be (its position left out of
                    // a connect too large with it) and moved on meanwhile: it goes on from
                    // where the server is.
                    this._gap({ type: "gap", roomID, offset: room.offset, epoch: room.epoch });
                  } else if (room.recovered === undefined && !at) {
                    // A history room this client did not hold: it starts where the ack says.
                    this._positions.set(roomID, { offset: room.offset, epoch: room.epoch });
                  }
                }
              }
              this._renewIn(ws, ack.expiresIn);
              this.connected = true;
              this._attempt = 0;
              const queued = this._queue.splice(0);
              for (const item of queued) this._transmit(item);
              safely(this.onOpen, this);
            },
            () => ws.close()
          );
      };
      ws.onmessage = (event) => {
        let frame;
        try {
          frame = JSON.parse(event.data);
        } catch (e) {
          return;
        }
        if (frame.type === "message") {
          if (typeof frame.offset === "number" && !this._advance(frame.roomID, frame.offset, frame.epoch)) {
            return; // had it already
          }
          frame.message = frame.payload; // the original client's name for it
          safely(this.onMessage, frame);
          return;
        }
        if (frame.type === "gap") {
          this._gap(frame);
          return;
        }
        if (frame.type === "join" || frame.type === "leave") {
          const callback = frame.type === "join" ? this.options.onJoin : this.options.onLeave;
          safely(callback, frame);
          return;
        }
        // Only an ack or an error answers a request (a frame type this client does not
        // know is ignored, as the protocol says).
        if (frame.type !== "ack" && frame.type !== "error") return;
        const pending = this._pending.get(frame.messageID);
        if (!pending) return;
        this._pending.delete(frame.messageID);
        if (pending.seq !== undefined && frame.type === "error" && RESEND_AFTER.has(frame.code)) {
          if (frame.code === "timeout") pending.maybePublished = true;
          this._retryLater(pending);
          return;
        }
        clearTimeout(pending.timer);
        if (frame.type === "ack") {
          if (pending.seq !== undefined && this._retries.length === 0) this._retryPause = 0;
          pending.resolve(frame);
        } else if (pending.maybePublished) {
          // Refused when sent again, after a send that may have been published.
          pending.reject(new ThinWSError("unsettled", frame.code + ": " + frame.message +
            " (an earlier send may have been published)", frame.messageID));
        } else pending.reject(new ThinWSError(frame.code, frame.message, frame.messageID));
      };
      ws.onclose = (event) => {
        clearTimeout(this._renewal);
        const wasConnected = this.connected;
        this.connected = false;
        if (wasConnected) safely(this.options.onClose, this);
        // Messages not acked go first on the next connection, in the order first sent,
        // unless the server closed over a frame it refused (one of them is the cause).
        const refused = REFUSED_A_FRAME.has(event && event.code);
        if (!wasConnected && connectLength > 0 && event && event.code === 1009 && this._positions.size > 0) {
          this._refusedLength = connectLength;
        }
        const again = this._takeRetries();
        for (const [id, pending] of this._pending) {
          if (pending.seq !== undefined && !refused && !pending.gaveUp) {
            pending.maybePublished = true;
            again.push(pending);
            continue;
          }
          // An unsubscribe whose outcome is unknown: the next connect's ack tells.
          if (pending.frame.type === "unsubscribe") this._leaving.add(pending.frame.roomID);
          clearTimeout(pending.timer);
          pending.reject(new ThinWSError("disconnected", "the connection dropped", id));
        }
        this._pending.clear();
        again.sort((a, b) => a.seq - b.seq);
        this._queue.unshift(...again);
        if (this._closed) return;
        const ceiling = Math.min(this.options.maxDelay, this.options.minDelay * 2 ** this._attempt);
        this._attempt += 1;
        const delay = ceiling / 2 + Math.random() * (ceiling / 2);
        setTimeout(() => {
          if (!this._closed) this._open();
        }, delay);
      };
    }

    // When the server says how long this socket's token lasts (`expiresIn`, seconds), asks
    // options.token (a function) for a new one at three quarters of that time and sends
    // `refresh`, so that the socket is not closed; tries again 5 s after a failure.
    _renewIn(ws, expiresIn) {
      clearTimeout(this._renewal);
      if (typeof expiresIn !== "number") return;
      this._renewAfter(ws, expiresIn * 750);
    }

    _renewAfter(ws, ms) {
      const token = this.options.token;
      if (typeof token !== "function") return;
      if (ms > MAX_TIMER) {
        // A token that lasts weeks: wait in steps setTimeout can take.
        this._renewal = setTimeout(() => this._renewAfter(ws, ms - MAX_TIMER), MAX_TIMER);
        return;
      }
      this._renewal = setTimeout(() => {
        if (this.ws !== ws || this._closed) return;
        Promise.resolve(token())
          .then((value) => (this.ws === ws ? this._send({ type: "refresh", token: value }) : null))
          .then(
            (ack) => ack && this._renewIn(ws, ack.expiresIn),
            (error) => {
              // The server does not renew credentials, or never will this one's.
              if (error.code === "not_enabled" || error.code === "invalid_message") return;
              this._renewAfter(ws, 5000);
            }
          );
      }, ms);
    }

    // A room this client holds that the server no longer lists (Redis lost the identity's
    // record): subscribed again, with `since` in a history room; the application gets a
    // gap unless everything was recovered, and a gap too if the room cannot be rejoined.
    _resubscribe(roomID) {
      const frame = { type: "subscribe", roomID };
      const at = this._positions.get(roomID);
      if (at) frame.since = at;
      this._send(frame).then(
        (ack) => {
          if (ack.recovered !== true) {
            this._gap({ type: "gap", roomID, offset: ack.offset, epoch: ack.epoch });
          }
          if (typeof ack.offset === "number" && !this._positions.has(roomID)) {
            this._positions.set(roomID, { offset: ack.offset, epoch: ack.epoch });
          }
        },
        (error) => {
          if (error.code === "disconnected") return; // tried again on the next connection
          if (error.code === "unavailable" || error.code === "timeout") {
            // Redis is struggling: reconnect, and try again then.
            if (this.ws) this.ws.close();
            return;
          }
          this._rooms.delete(roomID);
          this._positions.delete(roomID);
          this._gap({ type: "gap", roomID });
        }
      );
    }

    // Sends now on the open socket (used for `connect`, before the socket counts as connected).
    _send(frame) {
      return new Promise((resolve, reject) => {
        this._transmit({ frame, resolve, reject });
      });
    }

    _transmit(item) {
      if (item.gaveUp) return; // a message past its deadline is not sent again
      const id = this._nextID++;
      const frame = Object.assign({ messageID: id }, item.frame);
      this._deadline(item);
      item.id = id;
      this._pending.set(id, item);
      this.ws.send(JSON.stringify(frame));
    }

    // A request's deadline (options.timeout) runs from when it was made, queued while
    // disconnected included; a message keeps it across its resends. Past it, the request
    // is rejected and neither sent nor kept.
    _deadline(item) {
      if (item.timer !== undefined) return;
      item.timer = setTimeout(() => {
        item.gaveUp = true;
        if (item.id !== undefined) this._pending.delete(item.id);
        const queued = this._queue.indexOf(item);
        if (queued >= 0) this._queue.splice(queued, 1);
        item.reject(new ThinWSError("timeout", "no answer from the server in time", item.id ?? null));
      }, this.options.timeout);
    }

    // A message answered "timeout" or "unavailable": sent again with its key after a
    // pause (100 ms, doubling up to 2 s while they keep coming; short again after an ack).
    _retryLater(item) {
      this._retries.push(item);
      if (this._retryTimer !== null) return;
      this._retryPause = Math.min(2000, this._retryPause ? this._retryPause * 2 : 100);
      this._retryTimer = setTimeout(() => {
        this._retryTimer = null;
        const due = this._takeRetries();
        due.sort((a, b) => a.seq - b.seq);
        if (this.connected) for (const item of due) this._transmit(item);
        else this._queue.unshift(...due);
      }, this._retryPause);
    }

    _takeRetries() {
      clearTimeout(this._retryTimer);
      this._retryTimer = null;
      return this._retries.splice(0);
    }

    _request(frame, seq) {
      if (this._closed) {
        return Promise.reject(new ThinWSError("closed", "the client is closed", null));
      }
      return new Promise((resolve, reject) => {
        const item = { frame, resolve, reject, seq };
        if (this.connected) return this._transmit(item);
        if (this._queue.length >= this.options.maxQueue) {
          return reject(new ThinWSError("queue_full", "too many requests while disconnected", null));
        }
        this._deadline(item);
        this._queue.push(item);
      });
    }

    // `since` ({ offset, epoch }, e.g. from history()): in a room with history, the server
    // sends every message after it, then live ones (the ack says `recovered`).
    subscribe(roomID, since) {
      const frame = { type: "subscribe", roomID };
      if (since) frame.since = { offset: since.offset, epoch: since.epoch };
      return this._request(frame).then((ack) => {
        this._rooms.add(roomID);
        // A history room: where this client starts.
        if (typeof ack.offset === "number" && !this._positions.has(roomID)) {
          this._positions.set(roomID, since && ack.recovered ? since : { offset: ack.offset, epoch: ack.epoch });
        }
        if (ack.recovered === false) {
          this._gap({ type: "gap", roomID, offset: ack.offset, epoch: ack.epoch });
        }
        return ack;
      });
    }

    // The last `limit` messages a room with history keeps (all it keeps without `limit`),
    // oldest first: resolves to { offset, epoch, messages }. The server sends a long history
    // in pages (each within its byte budget, `more` when older ones are left); this asks
    // for them all. A room without history rejects with code "not_enabled".
    async history(roomID, limit) {
      const page = (limit, before) => {
        const frame = { type: "history", roomID };
        if (limit !== undefined) frame.limit = limit;
        if (before !== undefined) frame.before = before;
        return this._request(frame);
      };
      const first = await page(limit);
      let messages = first.messages;
      let more = first.more === true;
      while (more && messages.length > 0) {
        const wanted = limit === undefined ? undefined : limit - messages.length;
        if (wanted === 0) break;
        const earlier = await page(wanted, messages[0].offset);
        // A history recreated meanwhile (another epoch) does not continue this one.
        if (earlier.epoch !== first.epoch) break;
        messages = earlier.messages.concat(messages);
        more = earlier.more === true;
      }
      return { offset: first.offset, epoch: first.epoch, messages };
    }

    // Who is in a room with presence, on every node: resolves to { count, members }
    // (members may be cut at the server's maximum; count is exact). A room without presence
    // rejects with code "not_enabled".
    presence(roomID) {
      return this._request({ type: "presence", roomID }).then((ack) => ({
        count: ack.count,
        members: ack.members,
      }));
    }

    unsubscribe(roomID) {
      return this._request({ type: "unsubscribe", roomID }).then((ack) => {
        this._rooms.delete(roomID);
        this._positions.delete(roomID);
        return ack;
      });
    }

    // Publishes exactly once: resolves on the ack (sending again with the same key when
    // needed; see the top of this file).
    send(payload, roomID) {
      const seq = this._nextSeq++;
      const key = this._keyPrefix + "-" + seq;
      return this._request({ type: "message", roomID, payload, key }, seq);
    }

    // Leaves every room on this socket (the identity keeps its rooms) and closes for good.
    disconnect() {
      const done = this.connected
        ? this._request({ type: "disconnect" }).catch(() => {})
        : Promise.resolve();
      return done.then(() => {
        this._closed = true;
        for (const item of this._queue.splice(0)) {
          item.reject(new ThinWSError("closed", "the client is closed", null));
        }
        this.ws.close(1000);
      });
    }
  }

  global.ThinWSClient = ThinWSClient;
  global.ThinWSError = ThinWSError;
})(typeof globalThis !== "undefined" ? globalThis : window);

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
 * disconnected are queued (up to options.maxQueue) and sent after reconnecting; requests
 * already sent when the connection dropped reject with code "disconnected". An error frame
 * is never retried: a "timeout" rejection means the server does not know whether the
 * message went out (it may still be delivered), so only the caller can decide to resend.
 *
 * options: { minDelay: 250, maxDelay: 10000 (ms, the backoff), timeout: 10000 (ms per
 * request), maxQueue: 1000, onClose(client) (called when a connection drops), token (a string,
 * or a function returning a string or a promise of one, called before every connect: a
 * signed token for a server that requires one) }
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
      this._open();
    }

    _open() {
      const ws = new WebSocket(this.url);
      this.ws = ws;
      ws.onopen = () => {
        // options.token: a string, or a function returning one (or a promise of one), asked
        // again before every connect so that an expiring token can be renewed.
        const token = this.options.token;
        Promise.resolve(typeof token === "function" ? token() : token)
          .then((value) => {
            const frame = { type: "connect", connectionID: this.connectionID };
            if (value) frame.token = value;
            return this._send(frame);
          })
          .then(
            () => {
              this.connected = true;
              this._attempt = 0;
              const queued = this._queue.splice(0);
              for (const item of queued) this._transmit(item);
              this.onOpen(this);
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
          frame.message = frame.payload; // the original client's name for it
          this.onMessage(frame);
          return;
        }
        const pending = this._pending.get(frame.messageID);
        if (!pending) return;
        this._pending.delete(frame.messageID);
        clearTimeout(pending.timer);
        if (frame.type === "ack") pending.resolve(frame);
        else pending.reject(new ThinWSError(frame.code, frame.message, frame.messageID));
      };
      ws.onclose = () => {
        const wasConnected = this.connected;
        this.connected = false;
        if (wasConnected && this.options.onClose) this.options.onClose(this);
        for (const [id, pending] of this._pending) {
          clearTimeout(pending.timer);
          pending.reject(new ThinWSError("disconnected", "the connection dropped", id));
        }
        this._pending.clear();
        if (this._closed) return;
        const ceiling = Math.min(this.options.maxDelay, this.options.minDelay * 2 ** this._attempt);
        this._attempt += 1;
        const delay = ceiling / 2 + Math.random() * (ceiling / 2);
        setTimeout(() => {
          if (!this._closed) this._open();
        }, delay);
      };
    }

    // Sends now on the open socket (used for `connect`, before the socket counts as connected).
    _send(frame) {
      return new Promise((resolve, reject) => {
        this._transmit({ frame, resolve, reject });
      });
    }

    _transmit(item) {
      const id = this._nextID++;
      const frame = Object.assign({ messageID: id }, item.frame);
      item.timer = setTimeout(() => {
        this._pending.delete(id);
        item.reject(new ThinWSError("timeout", "no answer from the server in time", id));
      }, this.options.timeout);
      this._pending.set(id, item);
      this.ws.send(JSON.stringify(frame));
    }

    _request(frame) {
      if (this._closed) {
        return Promise.reject(new ThinWSError("closed", "the client is closed", null));
      }
      return new Promise((resolve, reject) => {
        const item = { frame, resolve, reject };
        if (this.connected) return this._transmit(item);
        if (this._queue.length >= this.options.maxQueue) {
          return reject(new ThinWSError("queue_full", "too many requests while disconnected", null));
        }
        this._queue.push(item);
      });
    }

    subscribe(roomID) {
      return this._request({ type: "subscribe", roomID });
    }

    unsubscribe(roomID) {
      return this._request({ type: "unsubscribe", roomID });
    }

    send(payload, roomID) {
      return this._request({ type: "message", roomID, payload });
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

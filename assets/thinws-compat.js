/*
 * thinws-compat.js: a drop-in for the original ThinWS client (the `thinws` npm package,
 * v1.0.x, no longer on the registry), served by thinws at /thinws-compat.js. No
 * dependencies.
 *
 *   <script src="/thinws-compat.js"></script>
 *   const ws = new ThinWSClient("ws://host/", "alice", (data) => {
 *     const frame = JSON.parse(data);   // every frame, acks included, as its raw string
 *   }, () => console.log("open"));
 *   ws.subscribe("lobby");
 *   const id = ws.send("hi", "lobby");  // the messageID, as the original returned it
 *   ws.getReadyState();                 // the WebSocket's readyState
 *
 * Its surface is the original's exactly: the constructor (url, connectionID, onMessage,
 * onOpen, timeout), connect, subscribe, unsubscribe, disconnect, send (returns the
 * messageID), getReadyState and hashCode; onMessage gets every frame's raw text; the
 * connectionID is sent hashed, as the original did; messageIDs start at a random number.
 * What differs, on purpose: a lost connection is redialled with exponential backoff and
 * jitter (from `timeout` ms, default 250, up to 10 s) instead of the original's tight loop
 * (it redialled with no delay when no timeout was given), and `disconnect` stops the
 * redialling. For promises, history, presence and tokens, use thinws.js.
 */
(function (global) {
  "use strict";

  class ThinWSClient {
    constructor(url, connectionID, userDefinedMessage, userDefinedOnOpen, timeout) {
      this.messageIndex = Math.floor(Math.random() * Number.MAX_SAFE_INTEGER);
      this.url = url;
      this.timeout = timeout;
      if (!connectionID) {
        throw Error("connectionID is required");
      }
      this.connectionID = this.hashCode(connectionID);
      this.userDefinedOnMessage = userDefinedMessage;
      this.userDefinedOnOpen = userDefinedOnOpen;
      this._attempt = 0;
      this._stopped = false;
      // The original's methods are arrow-function fields: bound, so that
      // `button.onclick = ws.disconnect` and `rooms.forEach(ws.subscribe)` work.
      for (const name of ["startup", "connect", "subscribe", "unsubscribe", "disconnect", "send", "getReadyState", "hashCode"]) {
        this[name] = this[name].bind(this);
      }
      this.startup(this.url, connectionID);
    }

    startup(url, connectionID) {
      const ws = new WebSocket(url);
      this.ws = ws;
      ws.onclose = () => {
        if (this._stopped || this.ws !== ws) return;
        const first = this.timeout > 0 ? this.timeout : 250;
        const ceiling = Math.min(10000, first * 2 ** this._attempt);
        this._attempt += 1;
        setTimeout(() => this.startup(url, connectionID), ceiling / 2 + Math.random() * (ceiling / 2));
      };
      ws.onopen = () => {
        this._attempt = 0;
        // As the original: an exception (from onOpen) is logged and `connect` sent again.
        try {
          this.connect();
          if (this.userDefinedOnOpen) {
            this.userDefinedOnOpen();
          }
        } catch (err) {
          console.log(err);
          this.connect();
        }
      };
      ws.onmessage = (message) => {
        if (this.userDefinedOnMessage) {
          this.userDefinedOnMessage(message.data);
        }
      };
    }

    // As the original: sent on the current socket as it is (a socket still connecting
    // throws, as it did there). A socket closed while this client waits to redial throws
    // too: a browser would drop the frame without a word, where the original's socket,
    // redialled at once, was connecting and threw.
    _frame(frame) {
      frame.messageID = this.messageIndex++;
      if (this.ws && this.ws.readyState >= 2) {
        throw new DOMException("the socket is closed; it is being redialled", "InvalidStateError");
      }
      if (this.ws) this.ws.send(JSON.stringify(frame));
      return frame.messageID;
    }

    connect() {
      this._stopped = false;
      this._frame({ type: "connect", connectionID: this.connectionID });
    }

    subscribe(roomID) {
      if (!roomID) {
        throw Error("roomID is required!");
      }
      this._frame({ type: "subscribe", roomID: roomID });
    }

    unsubscribe(roomID) {
      if (!roomID) {
        throw Error("roomID is required!");
      }
      this._frame({ type: "unsubscribe", roomID: roomID });
    }

    disconnect() {
      this._stopped = true;
      this._frame({ type: "disconnect" });
    }

    send(message, roomID) {
      if (!roomID) {
        throw Error("roomID is required!");
      }
      return this._frame({ type: "message", message: message, roomID: roomID });
    }

    getReadyState() {
      return this.ws ? this.ws.readyState : undefined;
    }

    hashCode(str) {
      let hash = 0;
      if (str.length === 0) return hash.toString();
      for (let i = 0; i < str.length; i++) {
        hash = (hash << 5) - hash + str.charCodeAt(i);
        hash |= 0; // a 32-bit integer
      }
      return hash.toString();
    }
  }

  global.ThinWSClient = ThinWSClient;
  // `const { ThinWSClient } = require(...)` or a bundler's `import { ThinWSClient }`.
  if (typeof module !== "undefined" && module.exports) {
    module.exports = { ThinWSClient, default: ThinWSClient };
  }
})(typeof globalThis !== "undefined" ? globalThis : window);

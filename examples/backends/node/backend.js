// An example backend for thinws's hooks over HTTP, in plain Node (no dependencies).
//
//   THINWS_SECRET=... PORT=3000 node examples/backends/node/backend.js
//   thinws --proxy-connect-url http://127.0.0.1:3000/thinws/connect \
//          --proxy-subscribe-url http://127.0.0.1:3000/thinws/subscribe \
//          --proxy-publish-url http://127.0.0.1:3000/thinws/publish \
//          --proxy-header Cookie --proxy-secret-file secret.txt \
//          --webhook-url http://127.0.0.1:3000/thinws/webhook
//
// It authenticates browsers by their session cookie at connect (and names them, and puts
// them in their personal room `user:<id>`), lets only
// admins into `private:admins` and "pro" users into `pro:` rooms, rewrites messages (a
// censored word), refuses calls that are not signed with THINWS_SECRET, and logs every
// event and webhook as one JSON line. The wire contract is docs/hooks/.
"use strict";
const http = require("node:http");
const crypto = require("node:crypto");

// Sessions your login would have made: cookie value -> user. A Map: a plain object would
// find `constructor` or `__proto__` too, and let such a cookie in.
const SESSIONS = new Map([
  ["alice-session", { id: "alice", plan: "pro", admin: true }],
  ["bob-session", { id: "bob", plan: "free", admin: false }],
]);
const SECRET = process.env.THINWS_SECRET || "";
if (!SECRET && process.env.THINWS_INSECURE !== "1") {
  console.error("set THINWS_SECRET (the secret thinws signs with), or THINWS_INSECURE=1 to accept unsigned calls");
  process.exit(2);
}
const MAX_BODY = 64 * 1024;

// Checks X-Thinws-Signature: v1=hex(HMAC-SHA256(secret, timestamp + "." + body)), and that
// the timestamp is within 5 minutes (so that a recorded call cannot be replayed later).
function signed(req, body) {
  if (!SECRET) return true;
  const timestamp = req.headers["x-thinws-timestamp"] || "";
  const signature = req.headers["x-thinws-signature"] || "";
  if (Math.abs(Date.now() / 1000 - Number(timestamp)) > 300) return false;
  const expected =
    "v1=" + crypto.createHmac("sha256", SECRET).update(`${timestamp}.`).update(body).digest("hex");
  const a = Buffer.from(signature);
  const b = Buffer.from(expected);
  return a.length === b.length && crypto.timingSafeEqual(a, b);
}

function cookie(req, name) {
  for (const part of (req.headers.cookie || "").split(";")) {
    const [key, ...value] = part.trim().split("=");
    if (key === name) return value.join("=");
  }
  return undefined;
}

const refuse = (code, message) => ({ error: { code, message } });

const handlers = {
  "/thinws/connect": (event, req) => {
    const user = SESSIONS.get(cookie(req, "session"));
    if (!user) return refuse("forbidden", "log in first");
    // Named after the user, with what later events need to know, and in a personal room
    // (joined now, without asking /subscribe) where the app can reach this user alone.
    return {
      result: {
        identity: user.id,
        rooms: [`user:${user.id}`],
        meta: { plan: user.plan, admin: user.admin },
      },
    };
  },
  "/thinws/subscribe": (event) => {
    const meta = (event.socket && event.socket.meta) || {};
    const room = String(event.room);
    if (room === "private:admins" && !meta.admin) return refuse("forbidden", "admins only");
    if (room.startsWith("pro:") && meta.plan !== "pro") {
      return refuse("forbidden", "upgrade to pro for this room");
    }
    return { result: {} };
  },
  "/thinws/publish": (event) => {
    const payload = event.payload;
    if (payload && typeof payload.text === "string") {
      return { result: { payload: { ...payload, text: payload.text.replace(/darn/gi, "****") } } };
    }
    return { result: {} };
  },
  // Notifications (--webhook-url): a room occupied or vacated on every node, a join or leave
  // in a presence room, a socket that ended. Nothing to answer: any 2xx acknowledges, and
  // thinws sends it again until one does. A real backend acts here (e.g. ends a game when
  // its room is vacated); `seq` orders a room's occupied/vacated, and its join/leave, across nodes.
  "/thinws/webhook": () => null,
};

const server = http.createServer((req, res) => {
  const handler = Object.hasOwn(handlers, req.url) ? handlers[req.url] : undefined;
  if (req.method !== "POST" || !handler) {
    res.writeHead(404).end();
    return;
  }
  const chunks = [];
  let size = 0;
  req.on("data", (chunk) => {
    size += chunk.length;
    if (size > MAX_BODY) {
      res.writeHead(413).end();
      req.destroy();
      return;
    }
    chunks.push(chunk);
  });
  req.on("end", () => {
    const body = Buffer.concat(chunks);
    if (!signed(req, body)) {
      console.log(JSON.stringify({ refused: "bad signature", path: req.url }));
      res.writeHead(401).end();
      return;
    }
    try {
      const event = JSON.parse(body);
      const answer = handler(event, req);
      if (answer === null) {
        console.log(JSON.stringify({ webhook: event }));
        res.writeHead(204).end();
        return;
      }
      console.log(JSON.stringify({ event: event.event, room: event.room, answer }));
      res.writeHead(200, { "content-type": "application/json" }).end(JSON.stringify(answer));
    } catch (e) {
      // Not an event this backend understands: thinws answers its client `unavailable`.
      res.writeHead(400).end();
    }
  });
});
server.listen(Number(process.env.PORT || 3000), "127.0.0.1", () => {
  console.log(JSON.stringify({ listening: server.address().port }));
});

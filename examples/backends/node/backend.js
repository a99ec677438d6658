// An example backend for thinws's hooks over HTTP, in plain Node (no dependencies).
//
//   THINWS_SECRET=... PORT=3000 node examples/backends/node/backend.js
//   thinws --proxy-connect-url http://127.0.0.1:3000/thinws/connect \
//          --proxy-subscribe-url http://127.0.0.1:3000/thinws/subscribe \
//          --proxy-publish-url http://127.0.0.1:3000/thinws/publish \
//          --proxy-header Cookie --proxy-secret-file secret.txt
//
// It authenticates browsers by their session cookie at connect (and names them), lets only
// admins into `private:admins` and "pro" users into `pro:` rooms, rewrites messages (a
// censored word), refuses calls that are not signed with THINWS_SECRET, and logs every
// event as one JSON line. The wire contract is docs/HOOKS.md.
"use strict";
const http = require("node:http");
const crypto = require("node:crypto");

// Sessions your login would have made: cookie value -> user.
const SESSIONS = {
  "alice-session": { id: "alice", plan: "pro", admin: true },
  "bob-session": { id: "bob", plan: "free", admin: false },
};
const SECRET = process.env.THINWS_SECRET || "";

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
    const user = SESSIONS[cookie(req, "session")];
    if (!user) return refuse("forbidden", "log in first");
    return { result: { identity: user.id, meta: { plan: user.plan, admin: user.admin } } };
  },
  "/thinws/subscribe": (event) => {
    const meta = event.socket.meta || {};
    if (event.room === "private:admins" && !meta.admin) return refuse("forbidden", "admins only");
    if (event.room.startsWith("pro:") && meta.plan !== "pro") {
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
  "/thinws/webhook": () => ({}),
};

const server = http.createServer((req, res) => {
  const chunks = [];
  req.on("data", (chunk) => chunks.push(chunk));
  req.on("end", () => {
    const body = Buffer.concat(chunks);
    const handler = handlers[req.url];
    if (req.method !== "POST" || !handler) {
      res.writeHead(404).end();
      return;
    }
    if (!signed(req, body)) {
      console.log(JSON.stringify({ refused: "bad signature", path: req.url }));
      res.writeHead(401).end();
      return;
    }
    let event;
    try {
      event = JSON.parse(body);
    } catch (e) {
      res.writeHead(400).end();
      return;
    }
    const answer = handler(event, req);
    console.log(JSON.stringify({ event: event.event || event.type, room: event.room, answer }));
    res.writeHead(200, { "content-type": "application/json" }).end(JSON.stringify(answer));
  });
});
server.listen(Number(process.env.PORT || 3000), "127.0.0.1", () => {
  console.log(JSON.stringify({ listening: server.address().port }));
});

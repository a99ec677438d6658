"""An example backend for thinws's hooks over HTTP, in plain Python (standard library only).

    THINWS_SECRET=... PORT=3000 python3 examples/backends/python/backend.py
    thinws --proxy-connect-url http://127.0.0.1:3000/thinws/connect \\
           --proxy-subscribe-url http://127.0.0.1:3000/thinws/subscribe \\
           --proxy-publish-url http://127.0.0.1:3000/thinws/publish \\
           --proxy-header Cookie --proxy-secret-file secret.txt \\
           --webhook-url http://127.0.0.1:3000/thinws/webhook

The same rules as the Node example: browsers are authenticated by their session cookie at
connect (named, and put in their personal room `user:<id>`), only admins enter `private:admins` and "pro" users `pro:` rooms,
messages are rewritten (a censored word), calls not signed with THINWS_SECRET are refused,
and every event and webhook is logged as one JSON line. The wire contract is docs/hooks/.
"""

import hashlib
import hmac
import json
import os
import re
import threading
import time
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# Sessions your login would have made: cookie value -> user.
SESSIONS = {
    "alice-session": {"id": "alice", "plan": "pro", "admin": True},
    "bob-session": {"id": "bob", "plan": "free", "admin": False},
}
SECRET = os.environ.get("THINWS_SECRET", "").encode()
MAX_BODY = 64 * 1024
# One line at a time: the server runs a thread per connection, and two prints at once
# would mix their lines.
PRINTING = threading.Lock()


def log(entry):
    with PRINTING:
        print(json.dumps(entry), flush=True)


def signed(headers, body):
    """X-Thinws-Signature: v1=hex(HMAC-SHA256(secret, timestamp + "." + body)), and a
    timestamp within 5 minutes (so that a recorded call cannot be replayed later)."""
    if not SECRET:
        return True
    timestamp = headers.get("X-Thinws-Timestamp", "")
    signature = headers.get("X-Thinws-Signature", "")
    try:
        if abs(time.time() - int(timestamp)) > 300:
            return False
    except ValueError:
        return False
    digest = hmac.new(SECRET, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(signature.encode(), ("v1=" + digest).encode())


def refuse(code, message):
    return {"error": {"code": code, "message": message}}


def connect(event, headers):
    cookie = SimpleCookie(headers.get("Cookie", ""))
    user = SESSIONS.get(cookie["session"].value) if "session" in cookie else None
    if user is None:
        return refuse("forbidden", "log in first")
    # Named after the user, with what later events need to know, and in a personal room
    # (joined now, without asking /subscribe) where the app can reach this user alone.
    return {
        "result": {
            "identity": user["id"],
            "rooms": ["user:" + user["id"]],
            "meta": {"plan": user["plan"], "admin": user["admin"]},
        }
    }


def subscribe(event, headers):
    meta = event["socket"].get("meta") or {}
    if event["room"] == "private:admins" and not meta.get("admin"):
        return refuse("forbidden", "admins only")
    if event["room"].startswith("pro:") and meta.get("plan") != "pro":
        return refuse("forbidden", "upgrade to pro for this room")
    return {"result": {}}


def publish(event, headers):
    payload = event.get("payload")
    if isinstance(payload, dict) and isinstance(payload.get("text"), str):
        text = re.sub("darn", "****", payload["text"], flags=re.IGNORECASE)
        return {"result": {"payload": {**payload, "text": text}}}
    return {"result": {}}


def webhook(event, headers):
    """Notifications (--webhook-url): a room occupied or vacated on every node, a join or
    leave in a presence room, a socket that ended. Nothing to answer: any 2xx acknowledges,
    and thinws sends it again until one does. A real backend acts here (e.g. ends a game
    when its room is vacated); `seq` orders a room's occupied/vacated, and its join/leave,
    across nodes."""
    log({"webhook": event})
    return None


HANDLERS = {
    "/thinws/connect": connect,
    "/thinws/subscribe": subscribe,
    "/thinws/publish": publish,
    "/thinws/webhook": webhook,
}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: thinws reuses its connections

    def do_POST(self):
        handler = HANDLERS.get(self.path)
        if handler is None:
            self.close_connection = True
            return self.reply(404, b"")
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY:
            self.close_connection = True
            return self.reply(413, b"")
        body = self.rfile.read(length)
        if not signed(self.headers, body):
            log({"refused": "bad signature", "path": self.path})
            return self.reply(401, b"")
        try:
            event = json.loads(body)
            answer = handler(event, self.headers)
        except (ValueError, KeyError, TypeError, AttributeError):
            # Not an event this backend understands: thinws answers its client `unavailable`.
            return self.reply(400, b"")
        if answer is None:
            return self.reply(204, b"")
        log({"event": event.get("event"), "room": event.get("room"), "answer": answer})
        self.reply(200, json.dumps(answer).encode(), "application/json")

    def reply(self, status, body, content_type="text/plain"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass  # one JSON line per event instead


if __name__ == "__main__":
    if not SECRET and os.environ.get("THINWS_INSECURE") != "1":
        raise SystemExit("set THINWS_SECRET (the secret thinws signs with), or THINWS_INSECURE=1 to accept unsigned calls")
    server = ThreadingHTTPServer(("127.0.0.1", int(os.environ.get("PORT", "3000"))), Handler)
    log({"listening": server.server_address[1]})
    server.serve_forever()

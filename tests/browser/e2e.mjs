// Two pages of the demo chat, on two thinws nodes, talk to each other in headless Chromium.
// Usage: node e2e.mjs <url of node A> <url of node B> [screenshot.png]
import { chromium } from "playwright-core";
import net from "node:net";

const [urlA, urlB, screenshot] = process.argv.slice(2);
if (!urlA || !urlB) {
  console.error("usage: node e2e.mjs URL_A URL_B [screenshot.png]");
  process.exit(2);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});
const timeout = 15000;
try {
  const context = await browser.newContext({ viewport: { width: 800, height: 720 } });
  const pageA = await context.newPage();
  const pageB = await context.newPage();
  for (const page of [pageA, pageB]) {
    page.setDefaultTimeout(timeout);
    page.on("pageerror", (e) => { console.error("page error:", e.message); process.exitCode = 1; });
  }
  async function join(page, url, name) {
    await page.goto(url);
    await page.fill("#name", name);
    await page.fill("#room", "lobby");
    await page.click("#join");
    await page.waitForSelector("#messages li.system:has-text('joined lobby')");
    await page.waitForSelector("#status.on");
  }
  await join(pageA, urlA, "ann");
  await join(pageB, urlB, "ben");
  // Who is here, live, across the two nodes: ann's page hears ben join on node B.
  async function here(page, names) {
    const want = names.slice().sort().join(",");
    await page.waitForFunction(
      (want) => [...document.querySelectorAll("#members li")].map((li) => li.textContent).join(",") === want,
      want
    );
  }
  await here(pageA, ["ann", "ben"]);
  await here(pageB, ["ann", "ben"]);
  console.log("ok: both pages show who is in the room");

  async function say(page, text) {
    await page.fill("#text", text);
    await page.click("#send");
  }
  async function sees(page, who, text) {
    await page.waitForSelector(`#messages li:has(.who:text-is("${who}")):has-text("${text}")`);
  }
  await say(pageA, "hello from node A");
  await sees(pageB, "ann", "hello from node A");
  await sees(pageA, "ann", "hello from node A");
  await say(pageB, "hi ann, this is node B");
  await sees(pageA, "ben", "hi ann, this is node B");
  await say(pageA, "two nodes, one room");
  await sees(pageB, "ann", "two nodes, one room");

  // The socket drops: thinws.js reconnects with backoff and sends `connect` again, and the
  // server gives ben his room back without the page doing anything.
  await pageB.evaluate(() => client.ws.close());
  await pageB.waitForSelector("#status.off");
  // Said while ben is away: the room keeps a history, so he gets it once he is back.
  await say(pageA, "said while ben was away");
  await pageB.waitForSelector("#status.on");
  await sees(pageB, "ann", "said while ben was away");
  await say(pageA, "still there, ben?");
  await sees(pageB, "ann", "still there, ben?");
  const away = await pageB.locator('#messages li:has-text("said while ben was away")').count();
  if (away !== 1) throw new Error(`the missed line showed ${away} times`);

  // A late joiner on node A sees what was said before (the room's history), once each.
  const pageC = await context.newPage();
  pageC.setDefaultTimeout(timeout);
  pageC.on("pageerror", (e) => { console.error("page error:", e.message); process.exitCode = 1; });
  await join(pageC, urlA, "cid");
  await sees(pageC, "ann", "hello from node A");
  await sees(pageC, "ben", "hi ann, this is node B");
  const copies = await pageC.locator('#messages li:has-text("hello from node A")').count();
  if (copies !== 1) throw new Error(`the history showed a line ${copies} times`);
  console.log("ok: a late joiner saw the room's history");
  await here(pageB, ["ann", "ben", "cid"]);
  await pageC.close();
  await here(pageB, ["ann", "ben"]);
  console.log("ok: the member list follows joins and leaves on the other node");

  // A request made while no server answers is rejected at its deadline (options.timeout),
  // not kept forever; and it no longer counts against the queue's bound.
  const unanswered = await pageA.evaluate(
    () =>
      new Promise((resolve) => {
        // Nothing listens on port 9: every attempt fails, the client keeps trying.
        const c = new ThinWSClient("ws://127.0.0.1:9/", "nobody", () => {}, () => {},
          { timeout: 300, maxQueue: 1, minDelay: 50, maxDelay: 100 });
        const started = Date.now();
        c.subscribe("r").then(
          () => resolve({ code: "acked" }),
          (e) => {
            const first = { code: e.code, ms: Date.now() - started };
            // Its place in the queue is free again.
            c.subscribe("s").then(
              () => resolve({ first, second: "acked" }),
              (e2) => resolve({ first, second: e2.code })
            );
          }
        );
      })
  );
  if (unanswered.first?.code !== "timeout" || unanswered.first.ms > 2000 ||
      unanswered.second !== "timeout") {
    throw new Error(`a request without a server did not time out: ${JSON.stringify(unanswered)}`);
  }
  console.log("ok: a request made while disconnected times out");

  // thinws.js on a node that requires tokens: `token` as a function returning a promise.
  const tokenNode = process.env.THINWS_TOKEN_NODE;
  if (tokenNode) {
    const sender = await pageA.evaluate(
      ([url, token]) =>
        new Promise((resolve, reject) => {
          setTimeout(() => reject(new Error("no connect with the token")), 10000);
          const ws = url.replace(/^http/, "ws");
          const c = new ThinWSClient(
            ws,
            "ignored",
            (msg) => resolve(msg.connectionID),
            async (client) => {
              try {
                await client.subscribe("secure");
                await client.send("with a token", "secure");
              } catch (e) {
                reject(e);
              }
            },
            { token: () => Promise.resolve(token) }
          );
        }),
      [tokenNode, process.env.THINWS_TOKEN]
    );
    if (sender !== "cat") throw new Error(`the token's identity was not used: ${sender}`);
    console.log("ok: thinws.js connected with a token");

    // The page signs its own HS256 tokens (WebCrypto) with the token node's secret.
    await pageA.evaluate((secret) => {
      const b64 = (bytes) =>
        btoa(String.fromCharCode(...new Uint8Array(bytes)))
          .replace(/=+$/, "").replace(/\+/g, "-").replace(/\//g, "_");
      const text = (s) => new TextEncoder().encode(s);
      window.sign = async (claims) => {
        const head = b64(text(JSON.stringify({ alg: "HS256", typ: "JWT" })));
        const body = b64(text(JSON.stringify(claims)));
        const key = await crypto.subtle.importKey(
          "raw", text(secret), { name: "HMAC", hash: "SHA-256" }, false, ["sign"]);
        const mac = await crypto.subtle.sign("HMAC", key, text(`${head}.${body}`));
        return `${head}.${body}.${b64(mac)}`;
      };
    }, process.env.THINWS_TOKEN_SECRET);

    // Tokens that last 3 s (the node closes a socket 5 s after `exp`): thinws.js asks its
    // token function again before the deadline and sends `refresh`; the socket never drops.
    const renewed = await pageA.evaluate(
      (url) =>
        new Promise((resolve, reject) => {
          let asked = 0;
          let drops = 0;
          let opens = 0;
          const c = new ThinWSClient(
            url.replace(/^http/, "ws"),
            "ignored",
            () => {},
            () => { opens += 1; },
            {
              token: () => {
                asked += 1;
                return window.sign({ sub: "cat", exp: Math.floor(Date.now() / 1000) + 3 });
              },
              onClose: () => { drops += 1; },
            }
          );
          setTimeout(async () => {
            try {
              await c.subscribe("secure");
              c.disconnect();
              resolve({ asked, drops, opens });
            } catch (e) {
              reject(e);
            }
          }, 14000);
        }),
      tokenNode
    );
    if (renewed.drops !== 0 || renewed.opens !== 1 || renewed.asked < 3) {
      throw new Error(`the socket was not kept by refresh: ${JSON.stringify(renewed)}`);
    }
    console.log("ok: thinws.js refreshed its token without dropping the socket");

    // Nothing vanishes silently. The token node keeps no history: when Redis cuts its
    // pub/sub connection, the page hears of a gap (no offset); when Redis loses the
    // identity's record and the socket reconnects, thinws.js subscribes again and says so.
    const redis = (line) =>
      new Promise((resolve, reject) => {
        const socket = net.connect(Number(process.env.THINWS_REDIS_PORT), "127.0.0.1", () =>
          socket.write(line + "\r\n"));
        socket.once("data", (data) => { socket.end(); resolve(data.toString()); });
        socket.on("error", reject);
      });
    await pageA.evaluate(
      (url) =>
        new Promise((resolve, reject) => {
          window.lost = { gaps: [], messages: [] };
          const c = new ThinWSClient(
            url.replace(/^http/, "ws"),
            "ignored",
            (msg) => window.lost.messages.push(msg.payload),
            () => {},
            {
              token: () => window.sign({ sub: "lou", exp: Math.floor(Date.now() / 1000) + 600 }),
              onGap: (gap) => window.lost.gaps.push(gap),
            }
          );
          window.lost.client = c;
          // "constructor": a room named like an Object.prototype key is a room like any.
          Promise.all([c.subscribe("lost-room"), c.subscribe("constructor")]).then(resolve, reject);
        }),
      tokenNode
    );
    // The gaps each room got so far.
    const gapsOf = (room) =>
      pageA.evaluate((room) => window.lost.gaps.filter((g) => g.roomID === room), room);
    const gapsReach = (n) =>
      pageA.waitForFunction((n) => ["lost-room", "constructor"].every(
        (room) => window.lost.gaps.filter((g) => g.roomID === room).length >= n), n);
    await redis("CLIENT KILL TYPE pubsub");
    await gapsReach(1);
    const cut = (await gapsOf("lost-room"))[0];
    if (cut.offset !== undefined) {
      throw new Error(`unexpected gap after the cut: ${JSON.stringify(cut)}`);
    }
    // The socket drops and comes back: the rooms keep no history, so what was published
    // meanwhile is gone, and the page is told.
    await pageA.evaluate(() => window.lost.client.ws.close());
    await gapsReach(2);
    const away = (await gapsOf("lost-room"))[1];
    if (away.offset !== undefined) {
      throw new Error(`unexpected gap after a reconnection: ${JSON.stringify(away)}`);
    }
    // Redis loses the identity's record: both rooms are subscribed again, each with a gap.
    await redis("FLUSHALL");
    await pageA.evaluate(() => window.lost.client.ws.close());
    await gapsReach(3);
    await pageA.evaluate(() => window.lost.client.send("back", "lost-room"));
    await pageA.evaluate(() => window.lost.client.send("proto", "constructor"));
    await pageA.waitForFunction(
      () => window.lost.messages.includes("back") && window.lost.messages.includes("proto"));
    console.log("ok: thinws.js reports gaps and rejoins a room Redis lost");
  }

  // Positions too large for a connect: a node that takes frames of 1 KiB at most, and six
  // history rooms whose positions take more. The reconnection's connect is closed with
  // 1009; thinws.js then connects without them. The room that got a message meanwhile is
  // told a gap; the quiet ones, whose positions the ack matches, are not.
  const smallNode = process.env.THINWS_SMALL_NODE;
  if (smallNode) {
    await pageA.evaluate(
      (url) =>
        new Promise((resolve, reject) => {
          window.big = { gaps: [], messages: [] };
          // Away for 1 to 2 s after each drop: time for the publisher below.
          const c = new ThinWSClient(url.replace(/^http/, "ws"), "ivy",
            (msg) => window.big.messages.push(msg.payload), () => {},
            { onGap: (gap) => window.big.gaps.push(gap), minDelay: 2000, maxDelay: 2000 });
          window.big.client = c;
          window.big.publisher = new ThinWSClient(url.replace(/^http/, "ws"), "ivy-publisher",
            () => {}, () => {});
          window.big.rooms = Array.from({ length: 6 }, (_, i) => `h${i}` + "x".repeat(180));
          (async () => {
            for (const room of window.big.rooms) {
              await c.subscribe(room);
              await c.send("first", room);
            }
            await window.big.publisher.subscribe("warm-up");
          })().then(resolve, reject);
        }),
      smallNode
    );
    await pageA.waitForFunction(() => window.big.messages.length >= 6);
    await pageA.evaluate(async () => {
      window.big.client.ws.close();
      await window.big.publisher.send("missed", window.big.rooms[0]);
    });
    await pageA.waitForFunction(() => window.big.client.connected);
    const gaps = await pageA.evaluate(() => window.big.gaps.map((gap) => `${gap.roomID}@${gap.offset}`));
    const want = [`${await pageA.evaluate(() => window.big.rooms[0])}@2`];
    if (JSON.stringify(gaps) !== JSON.stringify(want)) {
      throw new Error(`gaps after a connect too large: ${JSON.stringify(gaps)}`);
    }
    await pageA.evaluate(() => window.big.client.send("back", window.big.rooms[1]));
    await pageA.waitForFunction(() => window.big.messages.includes("back"));
    await pageA.evaluate(() => { window.big.client.disconnect(); window.big.publisher.disconnect(); });
    console.log("ok: thinws.js gives up positions too large for a connect, with a gap");
  }

  // thinws.js against a scripted server that misbehaves as no thinws node does (see
  // `scripted_server` in tests/browser.rs). This page's errors are expected (its callbacks
  // throw) and not counted.
  const scripted = process.env.THINWS_SCRIPTED;
  if (scripted) {
    const pageS = await context.newPage();
    pageS.setDefaultTimeout(timeout);
    await pageS.goto(urlA + "healthz");
    await pageS.addScriptTag({ url: urlA + "thinws.js" });
    // Runs `body(url, resolve, reject)` in the page, failing after 10 s.
    const scenario = (what, body) => pageS.evaluate(([what, body, url]) => new Promise((resolve, reject) => {
      setTimeout(() => reject(new Error(`${what}: no outcome in 10 s`)), 10000);
      new Function(`return (${body});`)()(url, resolve, reject);
    }), [what, body.toString(), scripted]);

    const unknown = await scenario("unknown frame type", (url, resolve, reject) => {
      const c = new ThinWSClient(url + "/unknown", "u", () => {}, () => {});
      c.subscribe("r").then((ack) => { c.disconnect(); resolve(ack); }, reject);
    });
    if (unknown.type !== "ack" || unknown.real !== true) {
      throw new Error(`a subscribe was answered by ${JSON.stringify(unknown)}`);
    }
    console.log("ok: thinws.js: a frame of an unknown type is not taken for an answer");

    const long = await scenario("long token", (url, resolve, reject) => {
      let opened = false;
      const c = new ThinWSClient(url + "/long", "l", () => {}, () => {
        if (opened) return;
        opened = true;
        setTimeout(() => c.subscribe("probe").then((ack) => { c.disconnect(); resolve(ack); }, reject), 1000);
      }, { token: () => "t" });
    });
    if (long.refreshes !== 0) throw new Error(`${long.refreshes} refreshes in a second`);
    console.log("ok: thinws.js: a token lasting weeks is not refreshed in a loop");

    const thrown = await scenario("throwing callbacks", (url, resolve) => {
      const got = [];
      const c = new ThinWSClient(url + "/throwing", "t", (msg) => {
        got.push(msg.payload);
        if (got.includes(2)) { c.disconnect(); resolve(got); }
        throw new Error("an onMessage that throws");
      }, () => { throw new Error("an onOpen that throws"); }, {
        minDelay: 20,
        maxDelay: 100,
        onClose: () => { throw new Error("an onClose that throws"); },
      });
    });
    if (JSON.stringify(thrown) !== "[1,2]") throw new Error(`delivered ${JSON.stringify(thrown)}`);
    console.log("ok: thinws.js: callbacks that throw stop neither deliveries nor reconnection");

    const slow = await scenario("slow token", (url, resolve, reject) => {
      let calls = 0;
      const c = new ThinWSClient(url + "/slow", "s", () => {}, () => {}, {
        minDelay: 20,
        maxDelay: 100,
        // The first socket's token comes after that socket was replaced.
        token: () => (++calls === 1 ? new Promise((r) => setTimeout(() => r("late"), 800)) : "fresh"),
      });
      setTimeout(() => c.subscribe("probe").then((ack) => { c.disconnect(); resolve(ack); }, reject), 1500);
    });
    if (slow.connects !== 1) throw new Error(`${slow.connects} connects on one socket`);
    console.log("ok: thinws.js: a slow token for a replaced socket sends no second connect");
  }

  // The drop-in for the original ThinWS client, used as the original's README shows: raw
  // strings in onMessage (acks included), send returning the messageID, getReadyState.
  const compat = async (url, name) => {
    const page = await context.newPage();
    page.setDefaultTimeout(timeout);
    await page.goto(url + "healthz");
    await page.addScriptTag({ url: url + "thinws-compat.js" });
    await page.evaluate((name) => new Promise((resolve) => {
      window.frames_ = [];
      const onMessage = (message) => { window.frames_.push(JSON.parse(message)); };
      const onOpen = () => resolve();
      window.wsClient = new ThinWSClient(location.origin.replace(/^http/, "ws") + "/", name, onMessage, onOpen);
    }), name);
    return page;
  };
  const oldA = await compat(urlA, "old-ann");
  const oldB = await compat(urlB, "old-ben");
  for (const page of [oldA, oldB]) {
    await page.evaluate(() => window.wsClient.subscribe("old-room"));
    await page.waitForFunction(() => window.frames_.some((f) => f.type === "ack"));
  }
  const sent = await oldA.evaluate(() => ({
    id: window.wsClient.send("hello from 2019", "old-room"),
    state: window.wsClient.getReadyState(),
  }));
  if (typeof sent.id !== "number" || sent.state !== 1) {
    throw new Error(`not the original's surface: ${JSON.stringify(sent)}`);
  }
  await oldA.waitForFunction((id) => window.frames_.some((f) => f.type === "ack" && f.messageID === id), sent.id);
  await oldB.waitForFunction(() =>
    window.frames_.some((f) => f.type === "message" && f.payload === "hello from 2019"));
  console.log("ok: the compatibility client works as the original's README shows, across nodes");

  // Node A dies (SIGKILL) while ann is typing, and comes back on its address. Redis is
  // frozen for a moment first, so that the lines typed then reach Redis, are published once
  // it thaws, and are never acked: thinws.js sends again every line not acked (with the
  // same idempotency key, so the server does not publish it twice) and queues what is typed
  // meanwhile, so both pages show every line exactly once, in order.
  const nodeA = JSON.parse(process.env.THINWS_NODE_A || "null");
  if (nodeA) {
    const { spawn } = await import("node:child_process");
    const lines = Array.from({ length: 24 }, (_, i) => `typed while node A died ${i}`);
    let restarted = null;
    for (let i = 0; i < lines.length; i++) {
      await say(pageA, lines[i]);
      if (i === 5) process.kill(nodeA.redis_pid, "SIGSTOP");
      if (i === 8) {
        process.kill(nodeA.pid, "SIGKILL");
        setTimeout(() => process.kill(nodeA.redis_pid, "SIGCONT"), 200);
        setTimeout(() => {
          // Not this script's THINWS_* variables: the server reads its settings from them.
          const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("THINWS_")));
          restarted = spawn(nodeA.command[0], nodeA.command.slice(1), { stdio: ["ignore", "ignore", "pipe"], env });
          restarted.stderr.on("data", (d) => process.stderr.write("node A again: " + d));
          restarted.on("exit", (code) => console.error("node A again exited:", code));
        }, 500);
      }
      await pageA.waitForTimeout(40);
    }
    try {
      for (const page of [pageA, pageB]) {
        await page.waitForSelector("#status.on").catch(async (e) => {
          const state = await page.evaluate(() => JSON.stringify({
            connected: client.connected, attempt: client._attempt, queued: client._queue.length,
            pending: client._pending.size, readyState: client.ws.readyState, url: client.url,
            status: document.querySelector("#status").textContent,
          }));
          const probe = await page.evaluate(() => new Promise((resolve) => {
            const ws = new WebSocket(client.url);
            ws.onopen = () => ws.send(JSON.stringify({ type: "connect", messageID: 1, connectionID: client.connectionID,
              since: Object.fromEntries(client._positions) }));
            ws.onmessage = (m) => resolve("reply: " + m.data);
            ws.onclose = (c) => resolve("closed: " + c.code + " " + c.reason);
            setTimeout(() => resolve("no answer"), 5000);
          }));
          throw new Error(`not reconnected: ${state}: ${probe}: ${e.message}`);
        });
        await sees(page, "ann", lines[lines.length - 1]);
        const shown = await page.$$eval("#messages li", (items) =>
          items.map((li) => li.textContent).filter((text) => text.includes("typed while node A died")));
        const expected = lines.map((line) => "ann" + line);
        const got = shown.map((text) => text.replace(/\s+/g, ""));
        const want = expected.map((text) => text.replace(/\s+/g, ""));
        if (JSON.stringify(got) !== JSON.stringify(want)) {
          throw new Error(`after the kill, a page shows:\n${shown.join("\n")}`);
        }
      }
      const notSent = await pageA.locator('#messages li:has-text("not sent")').count();
      if (notSent !== 0) throw new Error(`${notSent} lines were reported not sent`);
    } finally {
      if (restarted) restarted.kill("SIGKILL");
    }
    console.log("ok: the demo survives a node kill mid-typing without a lost or doubled line");
  }

  if (screenshot) await pageA.screenshot({ path: screenshot });
  console.log("ok: two pages on two nodes exchanged messages, and one reconnected");
} finally {
  await browser.close();
}

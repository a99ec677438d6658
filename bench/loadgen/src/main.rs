//! Load generator for thinws and Socket.IO servers.
//!
//! `thinws-bench run --target thinws --nodes http://127.0.0.1:9001,http://127.0.0.1:9002
//!  --pids 123,456 --scenario fanout --subscribers 1000 --messages 2000 --window 64`
//! prints one JSON line: deliveries per second, latency p50/p99/max, missing and
//! out-of-order deliveries, and each node's peak RSS. `thinws-bench chart results.jsonl
//! out.svg` draws deliveries/s and p99 against subscribers.

mod chart;
mod proto;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use proto::{Incoming, Rx, Target, Tx};
use serde::Serialize;
use tokio::sync::{Notify, Semaphore};
use tokio_tungstenite::tungstenite::Message;

#[derive(Parser)]
#[command(name = "thinws-bench")]
enum Cli {
    /// Runs one scenario and prints a JSON report.
    Run(RunArgs),
    /// Draws a chart from reports (one JSON object per line).
    Chart { input: PathBuf, output: PathBuf },
    /// Prints reports (one JSON object per line) as a Markdown table.
    Table { input: PathBuf },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Scenario {
    /// N subscribers of one room over the nodes, one publisher, K messages, window W.
    Fanout,
    /// N sockets in N/2 two-member rooms, each publishing K messages, window W each.
    Rooms,
    /// Like fanout, at a fixed rate instead of a window.
    Latency,
    /// N sockets each subscribed to a room; server RSS per socket.
    Idle,
    /// thinws history rooms: K messages are published while nobody listens, then N sockets
    /// subscribe with `since` (where the room stood before) and each recovers all K; the time
    /// from the first reconnection to the last recovered message.
    Recovery,
    /// thinws history rooms: N sockets, each in a history room of its own in which it has
    /// received one message. Redis cuts the nodes' pub/sub connections (`CLIENT KILL TYPE
    /// pubsub`, needs --redis-port) and one more message is published to every room at
    /// once: the time until every socket has it (the nodes reconnect, catch every history
    /// room up, then go on live).
    CatchUp,
    /// thinws presence rooms: N sockets subscribe to one room at once (256 at a time), each
    /// counted in its presence; the time until every one is visible (its subscribe acked),
    /// checked by a `presence` request that must count all N.
    JoinBurst,
}

#[derive(Parser, Clone)]
struct RunArgs {
    #[arg(long, value_enum)]
    target: Target,
    /// Base URLs of the nodes (`http://host:port`); sockets are spread over them.
    #[arg(long, value_delimiter = ',', required = true)]
    nodes: Vec<String>,
    /// The nodes' process ids, for their peak RSS.
    #[arg(long, value_delimiter = ',')]
    pids: Vec<u32>,
    #[arg(long, value_enum)]
    scenario: Scenario,
    /// Sockets (subscribers for fanout and latency).
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    /// Messages per publisher.
    #[arg(long, default_value_t = 2000)]
    messages: u64,
    /// Unacked messages a publisher may have in flight.
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// Approximate payload size in bytes.
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Messages per second, for the latency scenario.
    #[arg(long, default_value_t = 200)]
    rate: u64,
    /// Append the JSON report to this file too.
    #[arg(long)]
    out: Option<PathBuf>,
    /// A name for the server under test, written into the report (e.g. "socketioxide").
    #[arg(long)]
    label: Option<String>,
    /// thinws: every message carries an idempotency key of its own (protocol 1.2), to
    /// measure what keys cost.
    #[arg(long)]
    keys: bool,
    /// The port of the Redis the nodes use (on 127.0.0.1), for counting its commands
    /// (join-burst).
    #[arg(long)]
    redis_port: Option<u16>,
}

#[derive(Serialize, Default, serde::Deserialize, Clone)]
struct Report {
    target: String,
    scenario: String,
    sockets: usize,
    messages: u64,
    expected: u64,
    delivered: u64,
    missing: u64,
    out_of_order: u64,
    seconds: f64,
    deliveries_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    peak_rss_kib: Vec<u64>,
    rss_per_socket_kib: Option<f64>,
    /// Idle: the nodes' CPU per socket to open and subscribe it (µs), and per socket and
    /// second while idle (µs).
    #[serde(default)]
    cpu_us_per_socket_setup: Option<f64>,
    #[serde(default)]
    cpu_us_per_socket_second_idle: Option<f64>,
    /// What was measured, when the target alone does not say (e.g. "socketioxide").
    label: Option<String>,
    /// Redis commands per socket (join-burst): script calls, and every command Redis ran,
    /// those inside scripts included.
    #[serde(default)]
    redis_calls_per_socket: Option<f64>,
    #[serde(default)]
    redis_commands_per_socket: Option<f64>,
}

/// A process's CPU time so far (user + system), in seconds, from `/proc/PID/stat`.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // Clock ticks: 100 a second on Linux (`getconf CLK_TCK`).
    Some(ticks as f64 / 100.0)
}

fn cpu_of(pids: &[u32]) -> f64 {
    pids.iter().filter_map(|p| cpu_seconds(*p)).sum()
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Samples the nodes' RSS every 50 ms and keeps each one's peak.
fn watch_rss(pids: Vec<u32>) -> (Arc<Mutex<Vec<u64>>>, tokio::task::JoinHandle<()>) {
    let peaks = Arc::new(Mutex::new(vec![0u64; pids.len()]));
    let p = peaks.clone();
    let task = tokio::spawn(async move {
        loop {
            for (i, pid) in pids.iter().enumerate() {
                if let Some(rss) = rss_kib(*pid) {
                    let mut peaks = p.lock().unwrap();
                    peaks[i] = peaks[i].max(rss);
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    (peaks, task)
}

/// Source addresses: 127.0.0.2, .3, ... each for up to 5,000 sockets, well within one
/// address's ephemeral port range (sockets of earlier runs may still hold ports).
fn source_for(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (i / 5_000) as u8))
}

/// Connects `n` sockets spread over the nodes, each subscribed to `room(i)`.
async fn connect_all(args: &RunArgs, n: usize, room: impl Fn(usize) -> String) -> Vec<(Tx, Rx)> {
    let gate = Arc::new(Semaphore::new(256));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let url = args.target.url(&args.nodes[i % args.nodes.len()]);
        let target = args.target;
        let room = room(i);
        let gate = gate.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire().await;
            // A server may drop a socket while a burst of them connects (socketioxide with
            // its Redis adapter sometimes does), or leave one unanswered: try again, and say so.
            let mut attempt = 1;
            loop {
                let setup = async {
                    let (mut tx, mut rx) =
                        proto::connect(target, &url, Some(source_for(i))).await?;
                    proto::request(target, &mut tx, &mut rx, 1, target.subscribe(1, &room)).await?;
                    Ok::<_, String>((tx, rx))
                };
                let error = match tokio::time::timeout(Duration::from_secs(10), setup).await {
                    Ok(Ok(socket)) => break socket,
                    Ok(Err(e)) => e,
                    Err(_) => "no connection and subscription within 10 s".to_owned(),
                };
                if attempt == 6 {
                    panic!("socket {i}: {error}");
                }
                eprintln!("socket {i}: {error}; retrying");
                tokio::time::sleep(Duration::from_millis(50 * attempt)).await;
                attempt += 1;
            }
        }));
    }
    let mut sockets = Vec::with_capacity(n);
    for t in tasks {
        sockets.push(t.await.expect("connect task"));
    }
    sockets
}

fn now_us(base: Instant) -> u64 {
    base.elapsed().as_micros() as u64
}

/// What one receiving socket saw.
struct Seen {
    /// Each delivery's latency in µs, put into one histogram at the end: a histogram per
    /// socket (hundreds of KiB each) made every record a cache miss, 9 % of the generator's
    /// CPU in the latency scenario.
    latencies_us: Vec<u32>,
    delivered: u64,
    out_of_order: u64,
    /// When the last delivery arrived (µs since the run's base instant).
    last_us: u64,
    next: NextSeq,
    /// Why the socket ended before the run did, if it did.
    ended: Option<String>,
}

impl Seen {
    fn new() -> Self {
        Seen {
            latencies_us: Vec::new(),
            delivered: 0,
            out_of_order: 0,
            last_us: 0,
            next: NextSeq::default(),
            ended: None,
        }
    }

    /// Counts one delivery: its latency, and whether it came in its sender's order.
    fn record(&mut self, seq: u64, sent_us: u64, from: u64, base: Instant) {
        let now = now_us(base);
        let latency = now.saturating_sub(sent_us).clamp(1, 120_000_000);
        self.latencies_us.push(latency as u32);
        self.delivered += 1;
        self.last_us = now;
        if !self.next.in_order(from, seq) {
            self.out_of_order += 1;
        }
    }
}

/// The next sequence number expected from each sender (a socket hears one or two).
#[derive(Default)]
struct NextSeq(Vec<(u64, u64)>);

impl NextSeq {
    /// Records `seq` from `from`; `false` when it comes after a later one (out of order).
    fn in_order(&mut self, from: u64, seq: u64) -> bool {
        let slot = match self.0.iter().position(|(f, _)| *f == from) {
            Some(i) => &mut self.0[i].1,
            None => {
                self.0.push((from, 0));
                &mut self.0.last_mut().expect("pushed").1
            }
        };
        if seq < *slot {
            return false;
        }
        *slot = seq + 1;
        true
    }
}

/// Reads deliveries until `expected` arrived or `stop` fires; checks order per sender.
async fn receive(
    target: Target,
    mut tx: Tx,
    mut rx: Rx,
    expected: u64,
    base: Instant,
    stop: Arc<Notify>,
) -> Seen {
    let mut seen = Seen::new();
    let stopped = stop.notified();
    tokio::pin!(stopped);
    while seen.delivered < expected {
        let message = tokio::select! {
            _ = &mut stopped => break,
            m = rx.next() => m,
        };
        let Some(Ok(Message::Text(text))) = message else {
            match &message {
                None => seen.ended = Some("stream ended".into()),
                Some(Err(e)) => seen.ended = Some(format!("error: {e}")),
                Some(Ok(Message::Close(frame))) => {
                    seen.ended = Some(format!("close frame: {frame:?}"))
                }
                _ => continue,
            }
            if matches!(message, None | Some(Err(_))) {
                break;
            }
            continue;
        };
        match target.parse(&text) {
            Incoming::Delivery { seq, sent_us, from } => seen.record(seq, sent_us, from, base),
            Incoming::Ping => {
                let _ = tx.send(Message::text("3")).await;
            }
            _ => {}
        }
    }
    seen
}

/// Publishes `k` messages to `room`, at most `window` unacked (or at `rate` per second).
async fn publish(
    target: Target,
    tx: Tx,
    mut rx: Rx,
    room: String,
    k: u64,
    window: usize,
    rate: Option<u64>,
    from: u64,
    pad: String,
    base: Instant,
    keyed: bool,
) {
    let permits = Arc::new(Semaphore::new(window));
    let acker = {
        let permits = permits.clone();
        tokio::spawn(async move {
            let mut acked = 0;
            let mut pings = 0usize;
            while acked < k {
                match rx.next().await {
                    Some(Ok(Message::Text(text))) => match target.parse(&text) {
                        Incoming::Ack(_) => {
                            acked += 1;
                            permits.add_permits(1);
                        }
                        Incoming::Ping => pings += 1,
                        _ => {}
                    },
                    Some(Ok(_)) => {}
                    _ => break,
                }
            }
            (rx, pings)
        })
    };
    let mut tx = tx;
    let frame = |seq: u64| target.message(seq + 2, &room, seq, now_us(base), from, &pad, keyed);
    match rate {
        None => {
            if let Err(seq) = send_windowed(&mut tx, &permits, k, frame).await {
                eprintln!("publisher: stopped at message {seq}");
            }
        }
        Some(rate) => {
            let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / rate.max(1)));
            for seq in 0..k {
                ticker.tick().await;
                if tx.send(Message::text(frame(seq))).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = acker.await;
}

/// Sends messages `0..k` with at most `permits` unacked (acks add permits). Like a client
/// library writing what is ready in one go, it waits for one permit, takes all others free
/// at that moment, writes that many frames and flushes once. `Err(seq)` when acks stop
/// coming for 10 s or the socket fails.
async fn send_windowed(
    tx: &mut Tx,
    permits: &Semaphore,
    k: u64,
    mut frame: impl FnMut(u64) -> String,
) -> Result<(), u64> {
    let mut seq = 0;
    while seq < k {
        // A server that stops acking ends the run instead of hanging it.
        match tokio::time::timeout(Duration::from_secs(10), permits.acquire()).await {
            Ok(Ok(permit)) => permit.forget(),
            _ => return Err(seq),
        }
        let mut n = 1;
        while seq + n < k {
            match permits.try_acquire() {
                Ok(permit) => {
                    permit.forget();
                    n += 1;
                }
                Err(_) => break,
            }
        }
        for s in seq..seq + n {
            tx.feed(Message::text(frame(s))).await.map_err(|_| s)?;
        }
        tx.flush().await.map_err(|_| seq)?;
        seq += n;
    }
    Ok(())
}

fn summarize(
    args: &RunArgs,
    seen: Vec<Seen>,
    expected: u64,
    started_us: u64,
    peaks: Vec<u64>,
) -> Report {
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 120_000_000, 3).expect("histogram");
    let mut delivered = 0;
    let mut out_of_order = 0;
    let mut last = started_us;
    for s in &seen {
        for &latency in &s.latencies_us {
            let _ = histogram.record(u64::from(latency));
        }
        delivered += s.delivered;
        out_of_order += s.out_of_order;
        last = last.max(s.last_us);
    }
    let seconds = ((last - started_us) as f64 / 1e6).max(1e-9);
    Report {
        target: format!("{:?}", args.target).to_lowercase(),
        scenario: format!("{:?}", args.scenario).to_lowercase(),
        sockets: args.subscribers,
        messages: args.messages,
        expected,
        delivered,
        missing: expected.saturating_sub(delivered),
        out_of_order,
        seconds,
        deliveries_per_sec: delivered as f64 / seconds,
        p50_ms: histogram.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: histogram.value_at_quantile(0.99) as f64 / 1000.0,
        max_ms: histogram.max() as f64 / 1000.0,
        peak_rss_kib: peaks,
        rss_per_socket_kib: None,
        label: args.label.clone(),
        ..Report::default()
    }
}

/// Prints, per node, what its subscribers received (socket `i` is on node `i % nodes`), so
/// that a loss can be told apart: a whole node, some sockets, or the tail of the run.
fn per_node(seen: &[Seen], nodes: usize, expected_each: u64) {
    for node in 0..nodes {
        let on_node: Vec<&Seen> = seen.iter().skip(node).step_by(nodes).collect();
        let delivered: u64 = on_node.iter().map(|s| s.delivered).sum();
        let none = on_node.iter().filter(|s| s.delivered == 0).count();
        let all = on_node
            .iter()
            .filter(|s| s.delivered == expected_each)
            .count();
        let mut endings = std::collections::BTreeMap::<&str, usize>::new();
        for s in &on_node {
            if let Some(why) = &s.ended {
                *endings.entry(why.as_str()).or_default() += 1;
            }
        }
        for (why, count) in endings {
            eprintln!("node {}: {count} subscribers ended early: {why}", node + 1);
        }
        eprintln!(
            "node {}: {} subscribers, {delivered} of {} deliveries; {all} got everything, {none} got nothing",
            node + 1,
            on_node.len(),
            on_node.len() as u64 * expected_each
        );
    }
}

/// Waits for the receivers; once the publishers are done, gives late deliveries 5 s.
async fn collect(
    receivers: Vec<tokio::task::JoinHandle<Seen>>,
    publishers: Vec<tokio::task::JoinHandle<()>>,
    stop: Arc<Notify>,
) -> Vec<Seen> {
    for p in publishers {
        let _ = p.await;
    }
    let stopper = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(5)).await;
        stop.notify_waiters();
    });
    let mut seen = Vec::new();
    for r in receivers {
        seen.push(r.await.expect("receiver"));
    }
    stopper.abort();
    seen
}

async fn fanout(args: &RunArgs, rate: Option<u64>) -> Report {
    let (peaks, watcher) = watch_rss(args.pids.clone());
    let subscribers = connect_all(args, args.subscribers, |_| "fan".to_owned()).await;
    let (ptx, prx) = proto::connect(args.target, &args.target.url(&args.nodes[0]), None)
        .await
        .expect("publisher");
    let base = Instant::now();
    let stop = Arc::new(Notify::new());
    let receivers: Vec<_> = subscribers
        .into_iter()
        .map(|(tx, rx)| {
            tokio::spawn(receive(
                args.target,
                tx,
                rx,
                args.messages,
                base,
                stop.clone(),
            ))
        })
        .collect();
    let pad = "x".repeat(args.size.saturating_sub(40));
    let started = now_us(base);
    let publisher = tokio::spawn(publish(
        args.target,
        ptx,
        prx,
        "fan".into(),
        args.messages,
        if rate.is_some() { 1 << 20 } else { args.window },
        rate,
        0,
        pad,
        base,
        args.keys,
    ));
    let seen = collect(receivers, vec![publisher], stop).await;
    watcher.abort();
    per_node(&seen, args.nodes.len(), args.messages);
    let peaks = peaks.lock().unwrap().clone();
    summarize(
        args,
        seen,
        args.messages * args.subscribers as u64,
        started,
        peaks,
    )
}

async fn recovery(args: &RunArgs) -> Report {
    assert_eq!(
        args.target,
        Target::Thinws,
        "recovery needs thinws history rooms"
    );
    let (peaks, watcher) = watch_rss(args.pids.clone());
    let room = "recovery";
    let (mut ptx, mut prx) = proto::connect(args.target, &args.target.url(&args.nodes[0]), None)
        .await
        .expect("publisher");
    // Where the room stands before the messages the subscribers will miss.
    let probe = format!(r#"{{"type":"history","messageID":1,"roomID":"{room}","limit":0}}"#);
    let ack = proto::request_text(&mut ptx, &mut prx, 1, probe)
        .await
        .expect("a history room");
    let ack: serde_json::Value = serde_json::from_str(&ack).expect("the history ack");
    let (offset, epoch) = (
        ack["offset"].as_u64().expect("offset"),
        ack["epoch"].as_str().expect("epoch").to_owned(),
    );
    let base = Instant::now();
    let pad = "x".repeat(args.size.saturating_sub(40));
    publish(
        args.target,
        ptx,
        prx,
        room.into(),
        args.messages,
        args.window,
        None,
        0,
        pad,
        base,
        args.keys,
    )
    .await;
    // Every subscriber comes back at once, from `offset`.
    let started = now_us(base);
    let stop = Arc::new(Notify::new());
    let gate = Arc::new(Semaphore::new(256));
    let mut receivers = Vec::with_capacity(args.subscribers);
    for i in 0..args.subscribers {
        let url = args.target.url(&args.nodes[i % args.nodes.len()]);
        let (stop, gate, epoch) = (stop.clone(), gate.clone(), epoch.clone());
        let (target, k) = (args.target, args.messages);
        receivers.push(tokio::spawn(async move {
            let (tx, rx) = {
                let _permit = gate.acquire().await;
                let (mut tx, mut rx) = proto::connect(target, &url, Some(source_for(i))).await.expect("subscriber");
                let subscribe = format!(
                    r#"{{"type":"subscribe","messageID":1,"roomID":"{room}","since":{{"offset":{offset},"epoch":"{epoch}"}}}}"#
                );
                let ack = proto::request_text(&mut tx, &mut rx, 1, subscribe).await.expect("subscribe");
                assert!(ack.contains(r#""recovered":true"#), "not recovered: {ack}");
                (tx, rx)
            };
            receive(target, tx, rx, k, base, stop).await
        }));
    }
    let seen = collect(receivers, Vec::new(), stop).await;
    watcher.abort();
    let peaks = peaks.lock().unwrap().clone();
    summarize(
        args,
        seen,
        args.messages * args.subscribers as u64,
        started,
        peaks,
    )
}

async fn rooms(args: &RunArgs) -> Report {
    let n = args.subscribers - args.subscribers % 2;
    let (peaks, watcher) = watch_rss(args.pids.clone());
    // Pairs share a room, each member on a different node when there are two.
    let sockets = connect_all(args, n, |i| format!("pair-{}", i / 2)).await;
    let base = Instant::now();
    let stop = Arc::new(Notify::new());
    let pad = "x".repeat(args.size.saturating_sub(40));
    let started = now_us(base);
    let mut receivers = Vec::new();
    let mut publishers = Vec::new();
    for (i, (tx, rx)) in sockets.into_iter().enumerate() {
        // Each member publishes on its sending half; its receiving half counts its acks
        // (which open the window) among the deliveries.
        let target = args.target;
        let k = args.messages;
        let window = args.window;
        let keyed = args.keys;
        let pad = pad.clone();
        let stop = stop.clone();
        let room = format!("pair-{}", i / 2);
        let permits = Arc::new(Semaphore::new(window));
        let acks = permits.clone();
        receivers.push(tokio::spawn(async move {
            let (mut rx, expected) = (rx, 2 * k);
            let mut seen = Seen::new();
            let mut acked = 0;
            let stopped = stop.notified();
            tokio::pin!(stopped);
            while seen.delivered < expected || acked < k {
                let message = tokio::select! {
                    _ = &mut stopped => break,
                    m = rx.next() => m,
                };
                let Some(Ok(Message::Text(text))) = message else {
                    if matches!(message, None | Some(Err(_))) {
                        break;
                    }
                    continue;
                };
                match target.parse(&text) {
                    Incoming::Delivery { seq, sent_us, from } => {
                        seen.record(seq, sent_us, from, base)
                    }
                    Incoming::Ack(_) => {
                        acked += 1;
                        acks.add_permits(1);
                    }
                    _ => {}
                }
            }
            seen
        }));
        publishers.push(tokio::spawn(async move {
            let mut tx = tx;
            let _ = send_windowed(&mut tx, &permits, k, |seq| {
                target.message(seq + 2, &room, seq, now_us(base), i as u64, &pad, keyed)
            })
            .await;
            // Dropping the sending half leaves the socket open: the receiving half still
            // holds it.
        }));
    }
    let seen = collect(receivers, publishers, stop).await;
    watcher.abort();
    let peaks = peaks.lock().unwrap().clone();
    let mut args = args.clone();
    args.subscribers = n;
    summarize(&args, seen, 2 * args.messages * n as u64, started, peaks)
}

async fn idle(args: &RunArgs) -> Report {
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before: Vec<u64> = args.pids.iter().map(|p| rss_kib(*p).unwrap_or(0)).collect();
    let cpu_before = cpu_of(&args.pids);
    let started = Instant::now();
    let sockets = connect_all(args, args.subscribers, |i| format!("idle-{}", i % 100)).await;
    let connected = started.elapsed();
    let cpu_connected = cpu_of(&args.pids);
    // Keep answering pings while the servers settle.
    let mut keep = Vec::new();
    for (mut tx, mut rx) in sockets {
        let target = args.target;
        keep.push(tokio::spawn(async move {
            while let Some(Ok(message)) = rx.next().await {
                if let Message::Text(text) = message {
                    if target.parse(&text) == Incoming::Ping {
                        let _ = tx.send(Message::text("3")).await;
                    }
                }
            }
        }));
    }
    let idle_from = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cpu_idle = cpu_of(&args.pids) - cpu_connected;
    let idle_seconds = idle_from.elapsed().as_secs_f64();
    let after: Vec<u64> = args.pids.iter().map(|p| rss_kib(*p).unwrap_or(0)).collect();
    let grown: u64 = after
        .iter()
        .zip(&before)
        .map(|(a, b)| a.saturating_sub(*b))
        .sum();
    for k in keep {
        k.abort();
    }
    Report {
        target: format!("{:?}", args.target).to_lowercase(),
        scenario: "idle".into(),
        sockets: args.subscribers,
        seconds: connected.as_secs_f64(),
        peak_rss_kib: after,
        rss_per_socket_kib: Some(grown as f64 / args.subscribers as f64),
        cpu_us_per_socket_setup: Some((cpu_connected - cpu_before) * 1e6 / args.subscribers as f64),
        cpu_us_per_socket_second_idle: Some(
            cpu_idle * 1e6 / args.subscribers as f64 / idle_seconds,
        ),
        label: args.label.clone(),
        ..Report::default()
    }
}

async fn join_burst(args: &RunArgs) -> Report {
    assert_eq!(
        args.target,
        Target::Thinws,
        "join-burst needs thinws presence rooms"
    );
    let (pids, rss) = (args.pids.clone(), watch_rss(args.pids.clone()));
    let before = match args.redis_port {
        Some(port) => Some(redis_commandstats(port).await),
        None => None,
    };
    let started = Instant::now();
    let sockets = connect_all(args, args.subscribers, |_| "burst".to_owned()).await;
    // Each subscribe's ack means that its socket is counted on Redis.
    let visible = started.elapsed();
    let (calls, commands) = match (args.redis_port, before) {
        (Some(port), Some(before)) => {
            let after = redis_commandstats(port).await;
            let delta = |name: Option<&str>| {
                let sum = |stats: &HashMap<String, u64>| match name {
                    Some(name) => stats.get(name).copied().unwrap_or(0),
                    None => stats.values().sum(),
                };
                (sum(&after) - sum(&before)) as f64 / args.subscribers as f64
            };
            (Some(delta(Some("evalsha"))), Some(delta(None)))
        }
        _ => (None, None),
    };
    let url = args.target.url(&args.nodes[0]);
    let (mut tx, mut rx) = proto::connect(args.target, &url, None)
        .await
        .expect("the probe socket");
    let probe = r#"{"type":"presence","messageID":1,"roomID":"burst"}"#.to_owned();
    let ack = proto::request_text(&mut tx, &mut rx, 1, probe)
        .await
        .expect("a presence room");
    let ack: serde_json::Value = serde_json::from_str(&ack).expect("the presence ack");
    let counted = ack["count"].as_u64().expect("a count");
    rss.1.abort();
    drop(sockets);
    let peaks = rss.0.lock().unwrap().clone();
    let _ = pids;
    Report {
        target: format!("{:?}", args.target).to_lowercase(),
        scenario: "join-burst".into(),
        sockets: args.subscribers,
        expected: args.subscribers as u64,
        delivered: counted,
        missing: (args.subscribers as u64).saturating_sub(counted),
        seconds: visible.as_secs_f64(),
        deliveries_per_sec: args.subscribers as f64 / visible.as_secs_f64(),
        peak_rss_kib: peaks,
        label: args.label.clone(),
        redis_calls_per_socket: calls,
        redis_commands_per_socket: commands,
        ..Report::default()
    }
}

async fn catch_up(args: &RunArgs) -> Report {
    assert_eq!(
        args.target,
        Target::Thinws,
        "catch-up needs thinws history rooms"
    );
    let port = args.redis_port.expect("catch-up needs --redis-port");
    let (peaks, watcher) = watch_rss(args.pids.clone());
    let n = args.subscribers;
    let mut sockets = connect_all(args, n, |i| format!("catch-{i}")).await;
    let url = args.target.url(&args.nodes[0]);
    let (mut ptx, mut prx) = proto::connect(args.target, &url, None)
        .await
        .expect("the publisher");
    // One message to every room (pipelined), and every socket waits for its own.
    async fn round(ptx: &mut Tx, prx: &mut Rx, sockets: Vec<(Tx, Rx)>, k: u64) -> Vec<(Tx, Rx)> {
        let n = sockets.len();
        let waiting: Vec<_> = sockets
            .into_iter()
            .map(|(tx, mut rx)| {
                tokio::spawn(async move {
                    let wanted = format!(r#""payload":{k}"#);
                    while let Some(Ok(message)) = rx.next().await {
                        if matches!(&message, Message::Text(t) if t.contains(&wanted)) {
                            break;
                        }
                    }
                    (tx, rx)
                })
            })
            .collect();
        for i in 0..n {
            let frame = format!(
                r#"{{"type":"message","messageID":{i},"roomID":"catch-{i}","payload":{k}}}"#
            );
            ptx.feed(Message::text(frame)).await.expect("publish");
        }
        ptx.flush().await.expect("publish");
        let mut acked = 0;
        while acked < n {
            match prx.next().await {
                Some(Ok(Message::Text(text))) if text.starts_with(r#"{"type":"ack""#) => acked += 1,
                Some(Ok(Message::Text(text))) if text.starts_with(r#"{"type":"error""#) => {
                    panic!("refused: {text}")
                }
                Some(Ok(_)) => {}
                _ => panic!("the publisher's socket ended"),
            }
        }
        let mut back = Vec::with_capacity(n);
        for task in waiting {
            back.push(task.await.expect("a receiver"));
        }
        back
    }
    sockets = round(&mut ptx, &mut prx, sockets, 1).await;
    let started = Instant::now();
    redis_command(
        port,
        "*4\r\n$6\r\nCLIENT\r\n$4\r\nKILL\r\n$4\r\nTYPE\r\n$6\r\npubsub\r\n",
    )
    .await;
    let sockets = round(&mut ptx, &mut prx, sockets, 2).await;
    let seconds = started.elapsed().as_secs_f64();
    watcher.abort();
    drop(sockets);
    let peaks = peaks.lock().unwrap().clone();
    Report {
        target: format!("{:?}", args.target).to_lowercase(),
        scenario: "catch-up".into(),
        sockets: n,
        messages: 1,
        expected: n as u64,
        delivered: n as u64,
        seconds,
        deliveries_per_sec: n as f64 / seconds,
        peak_rss_kib: peaks,
        label: args.label.clone(),
        ..Report::default()
    }
}

/// Sends one command (`resp`, already encoded) to the Redis on `port` and reads its reply.
async fn redis_command(port: u16, resp: &str) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut redis = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to Redis");
    redis
        .write_all(resp.as_bytes())
        .await
        .expect("a Redis command");
    let mut reply = [0u8; 256];
    let _ = redis.read(&mut reply).await.expect("its reply");
}

/// Calls per command since Redis started (or `CONFIG RESETSTAT`), from `INFO commandstats`.
async fn redis_commandstats(port: u16) -> HashMap<String, u64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut redis = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to Redis");
    redis
        .write_all(b"*2\r\n$4\r\nINFO\r\n$12\r\ncommandstats\r\n")
        .await
        .expect("INFO");
    let mut reply = Vec::new();
    loop {
        let mut chunk = [0u8; 4096];
        let n = redis.read(&mut chunk).await.expect("read INFO");
        reply.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&reply);
        let Some((head, body)) = text.split_once("\r\n") else {
            continue;
        };
        let len: usize = head.trim_start_matches('$').parse().expect("a bulk reply");
        if n == 0 || body.len() >= len {
            return body
                .lines()
                .filter_map(|line| {
                    let (name, rest) = line.strip_prefix("cmdstat_")?.split_once(':')?;
                    let calls = rest
                        .strip_prefix("calls=")?
                        .split(',')
                        .next()?
                        .parse()
                        .ok()?;
                    Some((name.to_owned(), calls))
                })
                .collect();
        }
    }
}

fn read_reports(input: &std::path::Path) -> Vec<Report> {
    let text = std::fs::read_to_string(input).expect("read reports");
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("a report per line"))
        .collect()
}

fn print_table(reports: &[Report]) {
    println!("| scenario | server | sockets | msgs | deliveries/s | p50 ms | p99 ms | max ms | missing | out of order | peak RSS per node (MiB) | RSS per socket (KiB) |");
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |");
    for r in reports {
        let server = r.label.clone().unwrap_or_else(|| r.target.clone());
        let rss: Vec<String> = r
            .peak_rss_kib
            .iter()
            .map(|k| format!("{:.0}", *k as f64 / 1024.0))
            .collect();
        if r.scenario == "join-burst" {
            println!(
                "| join-burst | {server} | {} | | {:.0} joins/s | | | {:.0} (all {} counted) | {} | | {} | |",
                r.sockets,
                r.deliveries_per_sec,
                r.seconds * 1000.0,
                r.delivered,
                r.missing,
                rss.join(" / ")
            );
            if let (Some(calls), Some(commands)) =
                (r.redis_calls_per_socket, r.redis_commands_per_socket)
            {
                println!("| | Redis per join: {calls:.2} script calls, {commands:.1} commands in all | | | | | | | | | | |");
            }
            continue;
        }
        if r.scenario == "idle" {
            println!(
                "| idle | {server} | {} | | | | | | | | {} | {:.1} |",
                r.sockets,
                rss.join(" / "),
                r.rss_per_socket_kib.unwrap_or(0.0)
            );
            if let (Some(setup), Some(idle)) =
                (r.cpu_us_per_socket_setup, r.cpu_us_per_socket_second_idle)
            {
                println!("| | node CPU per socket: {setup:.0} µs to open and subscribe, {idle:.2} µs per second idle | | | | | | | | | | |");
            }
            continue;
        }
        println!(
            "| {} | {server} | {} | {} | {:.0} | {:.1} | {:.1} | {:.1} | {} | {} | {} | |",
            r.scenario,
            r.sockets,
            r.messages,
            r.deliveries_per_sec,
            r.p50_ms,
            r.p99_ms,
            r.max_ms,
            r.missing,
            r.out_of_order,
            rss.join(" / ")
        );
    }
}

#[tokio::main]
async fn main() {
    match Cli::parse() {
        Cli::Chart { input, output } => {
            chart::draw(&read_reports(&input), &output).expect("draw the chart");
            println!("wrote {}", output.display());
        }
        Cli::Table { input } => print_table(&read_reports(&input)),
        Cli::Run(args) => {
            let report = match args.scenario {
                Scenario::Fanout => fanout(&args, None).await,
                Scenario::Latency => fanout(&args, Some(args.rate)).await,
                Scenario::Rooms => rooms(&args).await,
                Scenario::Idle => idle(&args).await,
                Scenario::Recovery => recovery(&args).await,
                Scenario::JoinBurst => join_burst(&args).await,
                Scenario::CatchUp => catch_up(&args).await,
            };
            let line = serde_json::to_string(&report).expect("report");
            println!("{line}");
            if let Some(out) = &args.out {
                use std::io::Write;
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(out)
                    .expect("open the output file");
                writeln!(f, "{line}").expect("write the report");
            }
            // Sockets are dropped with the runtime.
            std::process::exit(0);
        }
    }
}

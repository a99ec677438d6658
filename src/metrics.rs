//! Metrics, emitted through the [`metrics`](https://docs.rs/metrics) facade.
//!
//! thinws records to whatever recorder the application installs (Prometheus, StatsD,
//! OpenTelemetry, ...); without one, recording costs next to nothing. Install the recorder
//! **before** building the layer: the per-socket counters' handles are taken once, when the
//! node's first socket opens, and every socket shares them. The standalone server installs
//! `metrics-exporter-prometheus` and serves `GET /metrics`.
//!
//! | name | kind | what |
//! | --- | --- | --- |
//! | `thinws_sockets` | gauge | open sockets on this node |
//! | `thinws_rooms` | gauge | rooms with members on this node |
//! | `thinws_redis_subscriptions` | gauge | room channels this node holds at Redis (0 while disconnected) |
//! | `thinws_frames_in_total` | counter | frames received from clients (added when the socket next writes: its answer included) |
//! | `thinws_frames_out_total` | counter | frames written to clients |
//! | `thinws_publishes_total` | counter | messages accepted by the broker (added when the socket next writes: the ack included) |
//! | `thinws_publish_duration_seconds` | histogram | time from a client's `message` to the broker's acceptance |
//! | `thinws_errors_total{code}` | counter | `error` frames sent, by code |
//! | `thinws_slow_reader_drops_total` | counter | sockets closed with 1013 because their queue was full |
//! | `thinws_redis_reconnects_total` | counter | times the pub/sub connection was re-established |
//! | `thinws_redis_pubsub_cut_total` | counter | times Redis cut the pub/sub connection (e.g. its output buffer limit) |
//! | `thinws_gaps_total` | counter | rooms whose local members were told they may have missed messages (`gap`) |
//! | `thinws_hook_unavailable_total{event}` | counter | hook calls answered `unavailable`, by event |
//! | `thinws_notifications_sent_total` | counter | notifications (webhooks) the notification hook took |
//! | `thinws_notifications_failed_total` | counter | failed calls of the notification hook (retried, unless refused for good or at shutdown) |
//! | `thinws_notifications_dropped_total` | counter | notifications dropped: oldest first from a full queue, refused for good by the hook, or failed at shutdown |
//! | `thinws_notifications_superseded_total` | counter | room notifications not sent because a newer one of the same room's occupancy (or identity's presence in it) replaced them in the queue |
//! | `thinws_notifications_queued` | gauge | notifications waiting to be sent |
//!
//! # Example
//!
//! ```
//! // With metrics-exporter-prometheus (no HTTP listener needed):
//! // let handle = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()?;
//! // ... build the ThinWsLayer, then serve `handle.render()` on your own route.
//! thinws::metrics::describe();
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Once};

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics::{Counter, Histogram, Unit};

use crate::protocol::ErrorCode;

/// Registers the descriptions (help texts and units) of every thinws metric with the
/// installed recorder. Called when a layer is built; call it yourself if you install the
/// recorder later.
pub fn describe() {
    describe_gauge!("thinws_sockets", "Open sockets on this node");
    describe_gauge!("thinws_rooms", "Rooms with members on this node");
    describe_gauge!(
        "thinws_redis_subscriptions",
        "Room channels this node holds at Redis"
    );
    describe_counter!("thinws_frames_in_total", "Frames received from clients");
    describe_counter!("thinws_frames_out_total", "Frames written to clients");
    describe_counter!("thinws_publishes_total", "Messages accepted by the broker");
    describe_histogram!(
        "thinws_publish_duration_seconds",
        Unit::Seconds,
        "Time from a client's message to the broker's acceptance"
    );
    describe_counter!("thinws_errors_total", "Error frames sent, by code");
    describe_counter!(
        "thinws_slow_reader_drops_total",
        "Sockets closed with 1013 because their outbound queue was full"
    );
    describe_counter!(
        "thinws_redis_reconnects_total",
        "Times the Redis pub/sub connection was re-established"
    );
    describe_counter!(
        "thinws_redis_pubsub_cut_total",
        "Times Redis closed the node's pub/sub connection (e.g. past its client-output-buffer-limit pubsub): what it had buffered for the node was lost, and its rooms' members got a gap"
    );
    describe_counter!(
        "thinws_gaps_total",
        "Rooms whose local members were told that messages may have been missed (gap frames, one per room)"
    );
    describe_counter!(
        "thinws_hook_unavailable_total",
        "Operations answered `unavailable` because a hook's backend did not answer, by event"
    );
    describe_counter!(
        "thinws_notifications_sent_total",
        "Notifications (webhooks) the notification hook took"
    );
    describe_counter!(
        "thinws_notifications_failed_total",
        "Calls of the notification hook that failed (retried unless refused for good or at shutdown)"
    );
    describe_counter!(
        "thinws_notifications_dropped_total",
        "Notifications dropped: oldest first from a full queue, refused for good, or failed at shutdown"
    );
    describe_counter!(
        "thinws_notifications_superseded_total",
        "Room notifications not sent because a newer one of the same subject replaced them in the queue"
    );
    describe_gauge!(
        "thinws_notifications_queued",
        "Notifications waiting to be sent"
    );
    // Rare events are shown as 0 from the start, so that dashboards and alerts see them.
    counter!("thinws_slow_reader_drops_total").increment(0);
    counter!("thinws_redis_reconnects_total").increment(0);
    counter!("thinws_redis_pubsub_cut_total").increment(0);
    counter!("thinws_gaps_total").increment(0);
    counter!("thinws_notifications_dropped_total").increment(0);
}

pub(crate) fn describe_once() {
    static DESCRIBED: Once = Once::new();
    DESCRIBED.call_once(describe);
}

/// The metric handles every socket of a node shares (taken once, when the node's first
/// socket opens).
#[derive(Debug)]
pub(crate) struct SocketMetrics {
    frames_in: Counter,
    frames_out: Counter,
    publishes: Counter,
    publish_duration: Histogram,
}

impl SocketMetrics {
    pub(crate) fn new() -> Self {
        SocketMetrics {
            frames_in: counter!("thinws_frames_in_total"),
            frames_out: counter!("thinws_frames_out_total"),
            publishes: counter!("thinws_publishes_total"),
            publish_duration: histogram!("thinws_publish_duration_seconds"),
        }
    }
}

/// One socket's metrics. Frames in and publishes are counted on the socket and added to
/// the node's shared counters just before the socket writes ([`SocketCounts::add_counted`])
/// and when it ends: one update of those shared cache lines per write rather than one per
/// frame. Every frame in is answered by a write, so a client that has its answer finds its
/// frame counted. (Atomics, but the socket's own: its reader, handling and writer share
/// them, all on the socket's task.)
#[derive(Debug)]
pub(crate) struct SocketCounts {
    shared: Arc<SocketMetrics>,
    /// Frames in and publishes not yet added to the shared counters.
    frames_in: AtomicU64,
    publishes: AtomicU64,
}

impl SocketCounts {
    pub(crate) fn new(shared: Arc<SocketMetrics>) -> Self {
        SocketCounts {
            shared,
            frames_in: AtomicU64::new(0),
            publishes: AtomicU64::new(0),
        }
    }

    /// A frame was read from the client.
    pub(crate) fn frame_in(&self) {
        self.frames_in.fetch_add(1, Ordering::Relaxed);
    }

    /// A publish was accepted, `took` after the client's `message` was read.
    pub(crate) fn published(&self, took: std::time::Duration) {
        self.publishes.fetch_add(1, Ordering::Relaxed);
        self.shared.publish_duration.record(took);
    }

    /// `frames` were written to the client (perhaps none).
    pub(crate) fn wrote(&self, frames: u64) {
        if frames > 0 {
            self.shared.frames_out.increment(frames);
        }
    }

    /// Adds the frames in and publishes counted on the socket to the shared counters.
    pub(crate) fn add_counted(&self) {
        for (counted, counter) in [
            (&self.frames_in, &self.shared.frames_in),
            (&self.publishes, &self.shared.publishes),
        ] {
            let n = counted.swap(0, Ordering::Relaxed);
            if n > 0 {
                counter.increment(n);
            }
        }
    }
}

impl Drop for SocketCounts {
    fn drop(&mut self) {
        self.add_counted();
    }
}

pub(crate) fn sockets(n: usize) {
    gauge!("thinws_sockets").set(n as f64);
}

pub(crate) fn room_opened() {
    gauge!("thinws_rooms").increment(1.0);
}

pub(crate) fn room_closed() {
    gauge!("thinws_rooms").decrement(1.0);
}

pub(crate) fn redis_subscriptions(n: usize) {
    gauge!("thinws_redis_subscriptions").set(n as f64);
}

pub(crate) fn error(code: ErrorCode) {
    counter!("thinws_errors_total", "code" => code.as_str()).increment(1);
}

pub(crate) fn slow_reader_dropped() {
    counter!("thinws_slow_reader_drops_total").increment(1);
}

pub(crate) fn hook_unavailable(event: &'static str) {
    counter!("thinws_hook_unavailable_total", "event" => event).increment(1);
}

pub(crate) fn notification_sent() {
    counter!("thinws_notifications_sent_total").increment(1);
}

pub(crate) fn notification_failed() {
    counter!("thinws_notifications_failed_total").increment(1);
}

pub(crate) fn notification_dropped() {
    counter!("thinws_notifications_dropped_total").increment(1);
}

pub(crate) fn notification_superseded() {
    counter!("thinws_notifications_superseded_total").increment(1);
}

pub(crate) fn notifications_queued(delta: f64) {
    gauge!("thinws_notifications_queued").increment(delta);
}

pub(crate) fn redis_pubsub_cut() {
    counter!("thinws_redis_pubsub_cut_total").increment(1);
}

pub(crate) fn gap() {
    counter!("thinws_gaps_total").increment(1);
}

pub(crate) fn redis_reconnected() {
    counter!("thinws_redis_reconnects_total").increment(1);
}

//! Per-room settings: which rooms keep a history, and which track presence.
//!
//! By default no room does, and every room takes the plain fast path. A layer can give every
//! room the same settings, or decide per room by prefix rules or a function:
//!
//! ```
//! use std::time::Duration;
//! use thinws::settings::{History, RoomSettings};
//!
//! let layer = thinws::ThinWsLayer::builder()
//!     // chat rooms keep their last 100 messages for 5 minutes of quiet
//!     .room_settings("chat:*", RoomSettings::with_history(History::new(100, Duration::from_secs(300))))
//!     // one room keeps more
//!     .room_settings("announcements", RoomSettings::with_history(History::new(1000, Duration::from_secs(86_400))))
//!     .build();
//! # let _ = layer;
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// How much of a room's past is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct History {
    /// Messages kept (the oldest go first).
    pub size: usize,
    /// How long the history of a room with no new message lives.
    pub ttl: Duration,
}

impl History {
    /// Keep the last `size` messages, for `ttl` after the last one.
    pub fn new(size: usize, ttl: Duration) -> Self {
        History {
            size: size.max(1),
            ttl: ttl.max(Duration::from_millis(1)),
        }
    }
}

/// Whether a room tracks who is in it, across every node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Presence {
    /// No tracking: `presence` answers `not_enabled` (the default; it costs nothing).
    #[default]
    Off,
    /// Clients (and [`Hub::presence`](crate::Hub::presence)) can ask who is in the room.
    /// Each socket's subscribe and unsubscribe cost one Redis script call.
    On,
    /// As [`On`](Presence::On), and the room's subscribers receive a `join` when an
    /// identity's first socket joins it (on any node) and a `leave` when its last one
    /// leaves: one more publish per such change.
    WithJoinLeave,
}

impl Presence {
    /// Whether the room tracks presence.
    pub fn is_on(self) -> bool {
        self != Presence::Off
    }

    /// Whether subscribers receive `join` and `leave` events.
    pub fn announces(self) -> bool {
        self == Presence::WithJoinLeave
    }
}

/// The settings of one room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct RoomSettings {
    /// Its history, if it keeps one: messages then carry an `offset` and an `epoch`, and
    /// clients can recover what they missed.
    pub history: Option<History>,
    /// Whether it tracks who is in it (and announces joins and leaves).
    pub presence: Presence,
    /// How long after a message with an idempotency key was published a resend with the
    /// same key (same room, same identity) is answered as a duplicate rather than published
    /// again (protocol 1.2): [`DEFAULT_IDEMPOTENCY_WINDOW`] unless set, at most
    /// [`MAX_IDEMPOTENCY_WINDOW`]. Zero turns keys off in the room: every publish goes out,
    /// keyed or not.
    pub idempotency_window: Duration,
}

/// The idempotency window of a room whose settings do not set one: 2 minutes.
pub const DEFAULT_IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(120);

/// The longest idempotency window honoured: a day (a longer one is cut to it).
pub const MAX_IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(24 * 60 * 60);

impl Default for RoomSettings {
    fn default() -> Self {
        RoomSettings {
            history: None,
            presence: Presence::Off,
            idempotency_window: DEFAULT_IDEMPOTENCY_WINDOW,
        }
    }
}

impl RoomSettings {
    /// A room with this history.
    pub fn with_history(history: History) -> Self {
        RoomSettings {
            history: Some(history),
            ..RoomSettings::default()
        }
    }

    /// A room that tracks presence this way.
    pub fn with_presence(presence: Presence) -> Self {
        RoomSettings {
            presence,
            ..RoomSettings::default()
        }
    }

    /// These settings, with this history.
    pub fn history(self, history: Option<History>) -> Self {
        RoomSettings { history, ..self }
    }

    /// These settings, with this presence.
    pub fn presence(self, presence: Presence) -> Self {
        RoomSettings { presence, ..self }
    }

    /// The window keys are honoured for, at most [`MAX_IDEMPOTENCY_WINDOW`]; `None` when
    /// it is zero (keys are ignored).
    pub(crate) fn idempotency(&self) -> Option<Duration> {
        (!self.idempotency_window.is_zero())
            .then(|| self.idempotency_window.min(MAX_IDEMPOTENCY_WINDOW))
    }

    /// These settings, with this idempotency window (zero turns keys off).
    ///
    /// ```
    /// use std::time::Duration;
    /// use thinws::settings::RoomSettings;
    ///
    /// let settings = RoomSettings::default().idempotency_window(Duration::from_secs(600));
    /// assert_eq!(settings.idempotency_window, Duration::from_secs(600));
    /// ```
    pub fn idempotency_window(self, idempotency_window: Duration) -> Self {
        RoomSettings {
            idempotency_window,
            ..self
        }
    }
}

/// A function that decides a room's settings.
type PolicyFn = Arc<dyn Fn(&str) -> RoomSettings + Send + Sync>;

/// Decides each room's settings.
#[derive(Clone, Default)]
pub(crate) struct RoomPolicy {
    /// Rules tried in order: an exact room name, or a prefix ending in `*`.
    rules: Vec<(String, RoomSettings)>,
    /// A function, asked when no rule matched.
    function: Option<PolicyFn>,
    /// For every other room.
    default: RoomSettings,
}

impl fmt::Debug for RoomPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RoomPolicy")
            .field("rules", &self.rules)
            .field("function", &self.function.is_some())
            .field("default", &self.default)
            .finish()
    }
}

impl RoomPolicy {
    pub(crate) fn rule(&mut self, pattern: impl Into<String>, settings: RoomSettings) {
        self.rules.push((pattern.into(), settings));
    }

    pub(crate) fn function(&mut self, f: PolicyFn) {
        self.function = Some(f);
    }

    pub(crate) fn default_settings(&mut self, settings: RoomSettings) {
        self.default = settings;
    }

    /// The settings of rooms no rule or function decides.
    pub(crate) fn defaults(&self) -> RoomSettings {
        self.default
    }

    /// Whether some room may keep a history (else every room takes the plain path).
    pub(crate) fn may_have_history(&self) -> bool {
        self.default.history.is_some()
            || self.function.is_some()
            || self
                .rules
                .iter()
                .any(|(_, settings)| settings.history.is_some())
    }

    /// The settings of `room`: the first matching rule, else the function, else the default.
    pub(crate) fn settings(&self, room: &str) -> RoomSettings {
        for (pattern, settings) in &self.rules {
            let matches = match pattern.strip_suffix('*') {
                Some(prefix) => room.starts_with(prefix),
                None => pattern == room,
            };
            if matches {
                return *settings;
            }
        }
        match &self.function {
            Some(f) => f(room),
            None => self.default,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_then_the_function_then_the_default() {
        let kept = RoomSettings::with_history(History::new(10, Duration::from_secs(1)));
        let more = RoomSettings::with_history(History::new(99, Duration::from_secs(1)));
        let mut policy = RoomPolicy::default();
        assert_eq!(policy.settings("any"), RoomSettings::default());
        assert!(!policy.may_have_history());
        policy.rule("chat:vip", more);
        policy.rule("chat:*", kept);
        assert_eq!(policy.settings("chat:vip"), more);
        assert_eq!(policy.settings("chat:x"), kept);
        assert!(policy.may_have_history());
        assert_eq!(policy.settings("chat"), RoomSettings::default());
        policy.function(Arc::new(move |room| match room.len() {
            1 => more,
            _ => RoomSettings::default(),
        }));
        assert_eq!(policy.settings("a"), more);
        assert_eq!(policy.settings("chat:x"), kept, "rules come first");
        policy.default_settings(more);
        assert_eq!(
            policy.settings("zz"),
            RoomSettings::default(),
            "the function decides"
        );
    }
}

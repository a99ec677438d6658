//! Flag values that cannot work, refused before anything starts.

use super::Args;

/// The longest duration a flag takes, in seconds (ten years): past it, adding it to the
/// clock would overflow.
const MAX_SECONDS: u64 = 10 * 365 * 24 * 60 * 60;

/// Refuses values that cannot work, before anything starts.
pub fn check(args: &Args) -> Result<(), String> {
    let seconds = [
        ("--drain-seconds", args.drain_seconds),
        ("--shutdown-timeout", args.shutdown_timeout),
        ("--header-read-timeout", args.header_read_timeout),
        ("--identity-ttl", args.identity_ttl),
        ("--history-ttl", args.history_ttl),
        ("--idempotency-window", args.idempotency_window),
        ("--presence-ttl", args.presence_ttl),
        ("--ping-interval", args.ping_interval),
        ("--idle-timeout", args.idle_timeout),
        ("--auth-grace", args.auth_grace),
    ];
    if let Some((flag, _)) = seconds.iter().find(|(_, s)| *s > MAX_SECONDS) {
        return Err(format!(
            "{flag} must be at most {MAX_SECONDS} seconds (ten years)"
        ));
    }
    if args.ping_interval == 0 || args.idle_timeout <= args.ping_interval {
        return Err(format!(
            "--idle-timeout ({} s) must be longer than --ping-interval ({} s), which must be above 0: a quiet socket shows it is alive only by answering pings",
            args.idle_timeout, args.ping_interval
        ));
    }
    for (flag, value) in [
        ("--identity-ttl", args.identity_ttl),
        ("--history-ttl", args.history_ttl),
        ("--presence-ttl", args.presence_ttl),
    ] {
        if value == 0 {
            return Err(format!("{flag} must be at least 1 second"));
        }
    }
    if args.rate_limit > 0 && args.rate_burst == 0 {
        return Err(
            "--rate-burst must be at least 1 (or turn the limit off with --rate-limit 0)".into(),
        );
    }
    if !args.redis_cluster_urls.is_empty() && args.key_prefix.contains(['{', '}']) {
        return Err("--key-prefix must not hold { or } on a Redis Cluster: a hash tag in it would put every room in one slot".into());
    }
    if args.max_sockets == 0 {
        return Err("--max-sockets must be at least 1".into());
    }
    if args.max_frame_size < 1024 {
        return Err("--max-frame-size must be at least 1024 bytes".into());
    }
    if args.path.as_deref().is_some_and(|p| !p.starts_with('/')) {
        return Err("--path must start with /".into());
    }
    Ok(())
}

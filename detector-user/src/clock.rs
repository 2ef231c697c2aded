//! The monotonic clock the kernel uses for expiries (`bpf_ktime_get_ns` is CLOCK_MONOTONIC).

use std::time::Duration;

/// Now on CLOCK_MONOTONIC, in ns.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write to; CLOCK_MONOTONIC always exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    debug_assert_eq!(rc, 0);
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CLOCK_REALTIME − CLOCK_MONOTONIC in ns: added to a kernel timestamp, gives wall-clock time.
pub fn realtime_minus_monotonic_ns() -> i64 {
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0);
    wall - monotonic_ns() as i64
}

/// The kernel expiry value for a TTL starting now; `None` (never expires) encodes as 0.
pub fn expiry_from_ttl(ttl: Option<Duration>) -> u64 {
    match ttl {
        Some(ttl) => monotonic_ns()
            .saturating_add(ttl.as_nanos().min(u64::MAX as u128) as u64)
            .max(1),
        None => 0,
    }
}

/// Time left before a kernel expiry value; `None` for "never", zero once expired.
pub fn remaining(expires_ns: u64) -> Option<Duration> {
    if expires_ns == 0 {
        return None;
    }
    Some(Duration::from_nanos(expires_ns.saturating_sub(monotonic_ns())))
}

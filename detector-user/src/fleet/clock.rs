//! Fleet time: the skew between this host's wall clock and the Redis server's, and the remaining TTL of a
//! received decision on this host.
//!
//! Expiries travel as absolute Unix ms (so a decision keeps its end time however late it arrives). Every host
//! measures `skew = Redis TIME − local wall clock`, corrected by half the round trip, and reads "now" on the
//! fleet's clock as `wall_now + skew`; a record's remaining TTL is `exp_ms − (wall_now + skew)`, dropped when
//! ≤ 0 and clamped to a maximum so a wrong or hostile expiry cannot pin an entry for years.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// This host's wall clock in Unix µs.
pub fn wall_now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// This host's wall clock in Unix ms.
pub fn wall_now_ms() -> u64 {
    wall_now_us() / 1_000
}

/// One skew measurement against the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Skew {
    /// Server clock − local clock, µs (positive: the server is ahead).
    pub skew_us: i64,
    /// Round trip of the `TIME` call that measured it, µs (the error bound is half of it).
    pub rtt_us: u64,
}

impl Skew {
    /// From local wall µs before sending `TIME`, the server's answer (µs) and local wall µs after the reply:
    /// the server read its clock, on average, half-way through the round trip.
    pub fn measure(local_before_us: u64, server_us: u64, local_after_us: u64) -> Self {
        let rtt_us = local_after_us.saturating_sub(local_before_us);
        let midpoint = local_before_us + rtt_us / 2;
        Self {
            skew_us: server_us as i64 - midpoint as i64,
            rtt_us,
        }
    }

    /// The measurement with the smallest round trip (the tightest bound), if any.
    pub fn best(samples: impl IntoIterator<Item = Self>) -> Option<Self> {
        samples.into_iter().min_by_key(|s| s.rtt_us)
    }

    /// The server's `TIME` reply (seconds, microseconds) in µs.
    pub fn server_us(secs: u64, micros: u64) -> u64 {
        secs.saturating_mul(1_000_000).saturating_add(micros)
    }

    /// Skew in ms, rounded toward zero.
    pub fn skew_ms(&self) -> i64 {
        self.skew_us / 1_000
    }

    /// "Now" on the fleet's (the server's) clock given local wall ms.
    pub fn fleet_now_ms(&self, wall_now_ms: u64) -> u64 {
        wall_now_ms.saturating_add_signed(self.skew_ms())
    }
}

/// Remaining TTL on this host of a record expiring at `exp_ms` (fleet clock): `None` once expired (drop it),
/// else at most `max_ttl`.
pub fn remaining(exp_ms: u64, wall_now_ms: u64, skew: Skew, max_ttl: Duration) -> Option<Duration> {
    let now = i128::from(wall_now_ms) + i128::from(skew.skew_ms());
    let rem = i128::from(exp_ms) - now;
    if rem <= 0 {
        return None;
    }
    let rem = Duration::from_millis(u64::try_from(rem).unwrap_or(u64::MAX));
    Some(rem.min(max_ttl))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_secs(86_400);

    #[test]
    fn skew_uses_the_midpoint_of_the_round_trip() {
        // Sent at 1000 µs, answered at 1400 µs, server said 5200 µs: it read its clock at ~1200 local.
        let s = Skew::measure(1_000, 5_200, 1_400);
        assert_eq!(
            s,
            Skew {
                skew_us: 4_000,
                rtt_us: 400
            }
        );
        let behind = Skew::measure(10_000, 7_000, 10_000);
        assert_eq!(behind.skew_us, -3_000);
        let best = Skew::best([s, Skew::measure(0, 4_100, 200), behind]).unwrap();
        assert_eq!(best, behind);
        assert_eq!(Skew::best([]), None);
        assert_eq!(Skew::server_us(2, 5), 2_000_005);
    }

    #[test]
    fn remaining_ttl_follows_the_fleet_clock() {
        let zero = Skew {
            skew_us: 0,
            rtt_us: 0,
        };
        assert_eq!(
            remaining(10_000, 4_000, zero, MAX),
            Some(Duration::from_millis(6_000))
        );
        // This host's clock is 2 s behind the server's: the same record has 2 s less left here.
        let ahead = Skew {
            skew_us: 2_000_000,
            rtt_us: 0,
        };
        assert_eq!(
            remaining(10_000, 4_000, ahead, MAX),
            Some(Duration::from_millis(4_000))
        );
        let behind = Skew {
            skew_us: -2_000_000,
            rtt_us: 0,
        };
        assert_eq!(
            remaining(10_000, 4_000, behind, MAX),
            Some(Duration::from_millis(8_000))
        );
        assert_eq!(ahead.fleet_now_ms(4_000), 6_000);
        assert_eq!(behind.fleet_now_ms(1_000), 0, "saturates at the epoch");
    }

    #[test]
    fn expired_records_are_dropped_and_long_ones_clamped() {
        let zero = Skew {
            skew_us: 0,
            rtt_us: 0,
        };
        assert_eq!(remaining(4_000, 4_000, zero, MAX), None);
        assert_eq!(remaining(3_999, 4_000, zero, MAX), None);
        assert_eq!(
            remaining(
                0,
                u64::MAX,
                Skew {
                    skew_us: i64::MAX,
                    rtt_us: 0
                },
                MAX
            ),
            None
        );
        assert_eq!(remaining(u64::MAX, 0, zero, MAX), Some(MAX));
        assert_eq!(
            remaining(
                u64::MAX,
                0,
                Skew {
                    skew_us: i64::MIN,
                    rtt_us: 0
                },
                MAX
            ),
            Some(MAX),
            "no overflow at the extremes"
        );
    }
}

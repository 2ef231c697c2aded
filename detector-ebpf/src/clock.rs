//! "Now" for one packet.

use aya_ebpf::helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns};
use detector_common::Config;

use crate::maps::AQD_TEST_CLOCK;

/// "Now", read at most once per packet and only when something needs it. Two resolutions: the precise clock
/// (`bpf_ktime_get_ns`, costly in VMs) for rate limits and event timestamps; the coarse one (same
/// CLOCK_MONOTONIC base, tick resolution, a memory read) for expiries and last-seen times.
pub struct Clock {
    now: u64,
    coarse: u64,
    test_now: u64,
}

impl Clock {
    #[inline(always)]
    pub fn new(config: &Config) -> Self {
        Self {
            now: 0,
            coarse: 0,
            test_now: config.test_now_ns,
        }
    }

    #[inline(always)]
    pub fn test_clock() -> bool {
        // SAFETY: a read-only global; volatile so the load is not folded at compile time.
        unsafe { core::ptr::read_volatile(&AQD_TEST_CLOCK) != 0 }
    }

    #[inline(always)]
    pub fn now(&mut self) -> u64 {
        if self.now == 0 {
            self.now = if Self::test_clock() {
                self.test_now
            } else {
                unsafe { bpf_ktime_get_ns() }
            };
        }
        self.now
    }

    #[inline(always)]
    pub fn coarse(&mut self) -> u64 {
        if self.now != 0 {
            return self.now;
        }
        if self.coarse == 0 {
            self.coarse = if Self::test_clock() {
                self.test_now
            } else {
                unsafe { bpf_ktime_get_coarse_ns() }
            };
        }
        self.coarse
    }
}

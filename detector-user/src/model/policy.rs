//! Scores → decisions for one entity (source, prefix or fingerprint cluster): tiers monitor → throttle → block,
//! hysteresis (enter/leave thresholds), blocks only after a sustained score, escalation for repeat offenders
//! (longer TTLs, a throttle escalates to a block) and decay (strikes fade after a quiet period).
//!
//! Pure logic over a 16-byte [`PolicyState`]; no clocks of its own (times are the model's seconds).

use serde::{Deserialize, Serialize};

/// What a decision does in the kernel: the one shared enum (names on it, serde by name).
pub use detector_common::Action;

/// Thresholds and TTLs. Thresholds are calibrated on the training scenarios (`model/weights.toml`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    pub monitor_enter: f32,
    pub monitor_leave: f32,
    pub throttle_enter: f32,
    pub throttle_leave: f32,
    pub block_enter: f32,
    pub block_leave: f32,
    /// The score must stay at or above `block_enter` this long before a block (halved per strike after the first).
    pub block_after_s: u32,
    pub monitor_ttl_s: u32,
    pub throttle_ttl_s: u32,
    pub block_ttl_s: u32,
    /// TTLs double per strike up to this.
    pub max_ttl_s: u32,
    /// From this many strikes on, a throttle is escalated to a block.
    pub escalate_at_strikes: u8,
    /// One strike is forgiven after this long without a new one.
    pub strike_decay_s: u32,
    /// Single-source tool rule: a source whose `sustained_templated` feature (sustained request rate × size
    /// repetition × regularity above Poisson) reaches this is at least throttled, whatever its cluster.
    /// Calibrated on the training scenarios above every honest source.
    pub tool_sustained_templated: f32,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            monitor_enter: 0.5,
            monitor_leave: 0.35,
            throttle_enter: 0.8,
            throttle_leave: 0.6,
            block_enter: 0.95,
            block_leave: 0.85,
            block_after_s: 30,
            monitor_ttl_s: 600,
            throttle_ttl_s: 600,
            block_ttl_s: 900,
            max_ttl_s: 86_400,
            escalate_at_strikes: 3,
            strike_decay_s: 86_400,
            tool_sustained_templated: 1.0,
        }
    }
}

/// Per-entity decision state (16 bytes).
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub(crate) struct PolicyState {
    pub until_s: u32,
    pub above_since_s: u32,
    pub last_strike_s: u32,
    pub tier: u8,
    pub strikes: u8,
}

/// One step's outcome: the action, its TTL, and whether it only refreshes the one in force.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Step {
    pub action: Action,
    pub ttl_s: u32,
    pub refresh: bool,
}

impl PolicyState {
    /// The tier in force at `now_s` (0 when none or expired).
    pub(crate) fn current(&self, now_s: u32) -> u8 {
        if now_s < self.until_s { self.tier } else { 0 }
    }

    pub(crate) fn active(&self, now_ns: u64) -> bool {
        self.tier >= 2 && ((now_ns / 1_000_000_000) as u32) < self.until_s
    }

    /// Advances the state with the entity's score at `now_s`; returns a decision to emit, if any.
    /// `max_tier` caps the action (fingerprint clusters are never blocked, for instance).
    pub(crate) fn step(&mut self, score: f32, now_s: u32, cfg: &PolicyConfig, max_tier: u8) -> Option<Step> {
        if self.strikes > 0 && now_s.saturating_sub(self.last_strike_s) > cfg.strike_decay_s {
            self.strikes -= 1;
            self.last_strike_s = now_s;
        }
        let current = self.current(now_s);
        if score >= cfg.block_enter {
            if self.above_since_s == 0 {
                self.above_since_s = now_s.max(1);
            }
        } else {
            self.above_since_s = 0;
        }
        let mut desired = 0u8;
        if score >= cfg.monitor_enter || (current >= 1 && score >= cfg.monitor_leave) {
            desired = 1;
        }
        if score >= cfg.throttle_enter || (current >= 2 && score >= cfg.throttle_leave) {
            desired = 2;
        }
        let need = cfg.block_after_s >> self.strikes.saturating_sub(1).min(8);
        let sustained = self.above_since_s != 0 && now_s.saturating_sub(self.above_since_s) >= need;
        if (score >= cfg.block_enter && sustained) || (current == 3 && score >= cfg.block_leave) {
            desired = 3;
        }
        if desired == 2 && self.strikes >= cfg.escalate_at_strikes {
            desired = 3;
        }
        let desired = desired.min(max_tier);
        if desired == 0 {
            return None;
        }
        let base = match desired {
            1 => cfg.monitor_ttl_s,
            2 => cfg.throttle_ttl_s,
            _ => cfg.block_ttl_s,
        };
        if desired > current {
            // A new offence (not the downgrade of a block that just ran out) is a strike.
            let continuing = self.tier >= 2 && now_s <= self.until_s.saturating_add(60);
            if desired >= 2 && current < 2 && !continuing {
                self.strikes = self.strikes.saturating_add(1);
                self.last_strike_s = now_s;
            }
        }
        // TTLs double with every strike after the first.
        let ttl = if desired >= 2 {
            base.saturating_mul(1 << self.strikes.saturating_sub(1).min(16))
                .min(cfg.max_ttl_s)
        } else {
            base
        };
        if desired > current {
            self.tier = desired;
            self.until_s = now_s.saturating_add(ttl);
            Some(Step {
                action: Action::from_u8(desired)?,
                ttl_s: ttl,
                refresh: false,
            })
        } else if desired == current && self.until_s.saturating_sub(now_s) < ttl / 2 {
            self.until_s = now_s.saturating_add(ttl);
            Some(Step {
                action: Action::from_u8(desired)?,
                ttl_s: ttl,
                refresh: true,
            })
        } else {
            // Below the current tier's leave threshold: let it run out (the kernel expires it).
            None
        }
    }
}

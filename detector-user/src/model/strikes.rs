//! The model's memory of repeat offenders, exported for the state store and restored at start: strikes (which
//! shorten the time to a block and lengthen TTLs) and the tier in force, so a restart neither forgets an
//! offender nor counts a decision still in force as a new offence.
//!
//! Times cross this boundary as ages and time left (no clock here): the caller maps them to wall-clock time.

use std::{net::IpAddr, time::Duration};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::{
    Action, Model, NS_PER_S, addr_key,
    features::{GroupState, SourceState},
    key_addr, key_net,
    policy::PolicyState,
    prefix_key,
};

/// The entity a strike record belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StrikeScope {
    Source(IpAddr),
    /// A /24 or /64.
    Prefix(IpNet),
    /// A fingerprint cluster by its model key.
    Fingerprint(u64),
}

/// One entity's strikes and tier, relative to the time of export.
#[derive(Clone, Debug, PartialEq)]
pub struct Strikes {
    pub scope: StrikeScope,
    pub strikes: u8,
    pub since_last_strike: Duration,
    /// The tier in force (None when none) and how long it has left.
    pub tier: Option<Action>,
    pub tier_left: Duration,
}

fn export(scope: StrikeScope, p: &PolicyState, now_s: u32) -> Option<Strikes> {
    let tier = Action::from_u8(p.current(now_s));
    (p.strikes > 0 || tier.is_some()).then(|| Strikes {
        scope,
        strikes: p.strikes,
        since_last_strike: Duration::from_secs(now_s.saturating_sub(p.last_strike_s) as u64),
        tier,
        tier_left: Duration::from_secs(p.until_s.saturating_sub(now_s) as u64),
    })
}

/// Applies a record to a policy state at `now_s`, with the decay the policy would have applied meanwhile
/// (one strike forgiven per `decay_s` without a new one).
fn import(p: &mut PolicyState, s: &Strikes, now_s: u32, decay_s: u32) {
    let mut strikes = s.strikes;
    let mut age = s.since_last_strike.as_secs().min(u32::MAX as u64) as u32;
    while strikes > 0 && decay_s > 0 && age > decay_s {
        strikes -= 1;
        age -= decay_s;
    }
    if strikes > p.strikes {
        p.strikes = strikes;
        // A strike older than the model's clock (before a reboot) starts its decay at 0: it lasts at most one
        // downtime longer than it would have.
        p.last_strike_s = now_s.saturating_sub(age);
    }
    if let Some(tier) = s.tier
        && !s.tier_left.is_zero()
        && (tier as u8) >= p.current(now_s)
    {
        p.tier = tier as u8;
        p.until_s = now_s.saturating_add(s.tier_left.as_secs().min(u32::MAX as u64) as u32);
    }
}

impl Model {
    /// Every entity with a strike or a tier in force at `now_ns`, at most `limit` of them.
    pub fn strikes(&self, now_ns: u64, limit: usize) -> Vec<Strikes> {
        let now_s = (now_ns / NS_PER_S) as u32;
        let sources = self
            .sources
            .iter()
            .filter_map(|(k, s)| export(StrikeScope::Source(key_addr(k)), &s.policy, now_s));
        let prefixes = self
            .prefixes
            .iter()
            .filter_map(|(k, g)| export(StrikeScope::Prefix(key_net(k)), &g.policy, now_s));
        let fps = self
            .fps
            .iter()
            .filter_map(|(k, g)| export(StrikeScope::Fingerprint(*k), &g.policy, now_s));
        sources.chain(prefixes).chain(fps).take(limit).collect()
    }

    /// Restores exported strikes at `now_ns` (the daemon's start): the entities are created if needed and keep
    /// the larger of their current and restored strikes.
    pub fn restore_strikes(&mut self, records: &[Strikes], now_ns: u64) -> usize {
        let now_s = (now_ns / NS_PER_S) as u32;
        let decay = self.weights.policy.strike_decay_s;
        let mut restored = 0;
        for r in records {
            let policy = match &r.scope {
                StrikeScope::Source(a) => {
                    &mut self
                        .sources
                        .get_or_insert(addr_key(*a), now_ns, || SourceState::new(now_ns, 0))
                        .policy
                }
                StrikeScope::Prefix(n) => {
                    &mut self
                        .prefixes
                        .get_or_insert(prefix_key(n.addr()), now_ns, || GroupState::new(now_ns))
                        .policy
                }
                StrikeScope::Fingerprint(k) => {
                    &mut self
                        .fps
                        .get_or_insert(*k, now_ns, || GroupState::new(now_ns))
                        .policy
                }
            };
            import(policy, r, now_s, decay);
            restored += 1;
        }
        restored
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ModelConfig, PolicyConfig};

    #[test]
    fn strikes_round_trip_with_decay() {
        let mut model = Model::new(ModelConfig::default());
        let now_ns = 100_000 * NS_PER_S;
        let decay = PolicyConfig::default().strike_decay_s as u64;
        let a: IpAddr = "192.0.2.7".parse().unwrap();
        let records = vec![
            Strikes {
                scope: StrikeScope::Source(a),
                strikes: 3,
                since_last_strike: Duration::from_secs(decay + 10),
                tier: Some(Action::Block),
                tier_left: Duration::from_secs(600),
            },
            Strikes {
                scope: StrikeScope::Prefix("198.51.100.0/24".parse().unwrap()),
                strikes: 1,
                since_last_strike: Duration::from_secs(5),
                tier: None,
                tier_left: Duration::ZERO,
            },
        ];
        assert_eq!(model.restore_strikes(&records, now_ns), 2);
        let mut out = model.strikes(now_ns, usize::MAX);
        out.sort_by_key(|s| s.strikes);
        assert_eq!(out.len(), 2);
        // One decay period passed since the last strike: one strike forgiven, its age reduced by the period.
        assert_eq!(out[1].scope, StrikeScope::Source(a));
        assert_eq!(out[1].strikes, 2);
        assert_eq!(out[1].since_last_strike, Duration::from_secs(10));
        assert_eq!(out[1].tier, Some(Action::Block));
        assert_eq!(out[1].tier_left, Duration::from_secs(600));
        assert_eq!(out[0].strikes, 1);
        assert_eq!(out[0].since_last_strike, Duration::from_secs(5));
        assert_eq!(out[0].tier, None);
    }
}

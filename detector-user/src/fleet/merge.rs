//! The fleet's merge rules for one key (pure: no I/O, no clock; "now" is an argument).
//!
//! State per key: one slot per origin (a last-writer-wins register over the stamp `(ts_ms, host)`, holding a
//! put or a withdraw) and at most one operator tombstone (the newest operator unblock). Rules:
//! - one entry per origin: one expiring never removes another;
//! - same origin: the newer stamp wins;
//! - an operator unblock removes every slot not newer than it and rejects any later-arriving record not newer
//!   than it (of any origin), so a stale outbox replay cannot undo an unblock; until its hold ends the
//!   automated origins (model, fingerprint stage, fleet) are ignored for the key;
//! - effective verdict: operator-class origins (operator, list edit) first if any is active, else the automated
//!   ones; among them the strongest: block > throttle (lowest packets/s) > monitor.
//!
//! Stamps are unique (each host's timestamps strictly increase), which makes [`KeyState::apply`] commutative and
//! idempotent: any delivery order of the same records converges to the same state. The Redis Functions in
//! [`super::engine`] apply the same accept/reject rule atomically on the server.

use std::collections::BTreeMap;

use detector_common::Action;

use super::wire::{Entry, FleetOrigin, HostName, Op, Rate, Record};

/// Total order of records: wall-clock ms, then the host name (unique per host and ms by construction).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Stamp {
    pub ts_ms: u64,
    pub host: HostName,
}

impl Stamp {
    pub fn of(r: &Record) -> Self {
        Self {
            ts_ms: r.ts_ms,
            host: r.host.clone(),
        }
    }
}

/// One origin's register.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Slot {
    Put {
        stamp: Stamp,
        entry: Entry,
    },
    /// The origin withdrew its entry.
    Withdrawn {
        stamp: Stamp,
    },
}

impl Slot {
    fn stamp(&self) -> &Stamp {
        match self {
            Self::Put { stamp, .. } | Self::Withdrawn { stamp } => stamp,
        }
    }
}

/// The newest operator unblock of a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tombstone {
    pub stamp: Stamp,
    /// Automated origins are ignored until then (wall ms).
    pub hold_until_ms: Option<u64>,
}

/// Why a record changed nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stale {
    /// Not newer than the key's operator unblock.
    BeforeUnblock,
    /// Not newer than what its origin's slot holds (includes an exact duplicate).
    Superseded,
}

/// Result of applying one record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    Rejected(Stale),
}

/// The merged state of one key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyState {
    slots: BTreeMap<FleetOrigin, Slot>,
    tombstone: Option<Tombstone>,
}

/// What the kernel should do for a key at some instant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effective {
    /// Nothing active.
    Nothing,
    /// An operator unblock holds the key allowed (against automated origins) until then.
    Held { until_ms: u64 },
    /// The winning entry, with who made it.
    Act {
        entry: Entry,
        origin: FleetOrigin,
        host: HostName,
    },
}

/// Strength order: block > throttle (lower rate = stronger) > monitor. Larger = stronger.
fn strength(e: &Entry) -> (u8, u64) {
    match (e.action, e.rate) {
        (Action::Block, _) => (3, 0),
        (
            Action::Throttle,
            Some(Rate {
                packets_per_sec,
                class,
            }),
        ) => (
            2,
            u64::MAX - ((u64::from(packets_per_sec) << 8) | u64::from(class)),
        ),
        (Action::Throttle, None) => (2, 0),
        (Action::Monitor, _) => (1, 0),
    }
}

impl KeyState {
    /// Applies one record under the rules in the module doc.
    pub fn apply(&mut self, r: &Record) -> Outcome {
        let stamp = Stamp::of(r);
        if let Some(t) = &self.tombstone
            && stamp <= t.stamp
        {
            return Outcome::Rejected(Stale::BeforeUnblock);
        }
        match (r.origin, r.op) {
            (FleetOrigin::Operator, Op::Del { hold_until_ms }) => {
                self.slots.retain(|_, s| *s.stamp() > stamp);
                self.tombstone = Some(Tombstone { stamp, hold_until_ms });
                Outcome::Applied
            }
            (origin, op) => {
                if let Some(s) = self.slots.get(&origin)
                    && *s.stamp() >= stamp
                {
                    return Outcome::Rejected(Stale::Superseded);
                }
                let slot = match op {
                    Op::Put(entry) => Slot::Put { stamp, entry },
                    Op::Del { .. } => Slot::Withdrawn { stamp },
                };
                self.slots.insert(origin, slot);
                Outcome::Applied
            }
        }
    }

    /// The verdict at wall time `now_ms` (server-aligned).
    pub fn effective(&self, now_ms: u64) -> Effective {
        let held_until = self
            .tombstone
            .as_ref()
            .and_then(|t| t.hold_until_ms)
            .filter(|&h| h > now_ms);
        let active = |operator: bool| {
            self.slots
                .iter()
                .filter(move |(o, _)| o.is_operator() == operator)
                .filter_map(|(o, s)| match s {
                    Slot::Put { stamp, entry } if entry.active(now_ms) => Some((*o, stamp, entry)),
                    _ => None,
                })
                // Ties in strength: the later expiry (permanent last), then the origin order.
                .max_by_key(|(o, _, e)| (strength(e), e.expires_ms.map_or(u64::MAX, |x| x), *o))
        };
        let best = active(true).or_else(|| if held_until.is_some() { None } else { active(false) });
        match (best, held_until) {
            (Some((origin, stamp, entry)), _) => Effective::Act {
                entry: *entry,
                origin,
                host: stamp.host.clone(),
            },
            (None, Some(until_ms)) => Effective::Held { until_ms },
            (None, None) => Effective::Nothing,
        }
    }

    /// The latest wall time at which this state can still matter (`None` = never ends), given how long
    /// tombstones and withdraws are kept (`retain_ms`) to reject stale replays.
    pub fn relevant_until_ms(&self, retain_ms: u64) -> Option<u64> {
        let mut until = 0u64;
        for s in self.slots.values() {
            match s {
                Slot::Put { entry, .. } => match entry.expires_ms {
                    None => return None,
                    Some(e) => until = until.max(e),
                },
                Slot::Withdrawn { stamp } => until = until.max(stamp.ts_ms.saturating_add(retain_ms)),
            }
        }
        if let Some(t) = &self.tombstone {
            until = until
                .max(t.stamp.ts_ms.saturating_add(retain_ms))
                .max(t.hold_until_ms.unwrap_or(0));
        }
        Some(until)
    }

    /// The slot of one origin.
    pub fn slot(&self, origin: FleetOrigin) -> Option<&Slot> {
        self.slots.get(&origin)
    }

    pub fn tombstone(&self) -> Option<&Tombstone> {
        self.tombstone.as_ref()
    }

    /// No slot and no tombstone.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty() && self.tombstone.is_none()
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng, rngs::SmallRng, seq::SliceRandom};

    use super::*;
    use crate::fleet::wire::FleetKey;

    const NOW: u64 = 1_800_000_000_000;

    fn host(n: u8) -> HostName {
        HostName::new(&format!("h{n}")).unwrap()
    }

    fn key() -> FleetKey {
        FleetKey::addr("198.51.100.9".parse().unwrap())
    }

    fn put(
        origin: FleetOrigin,
        h: u8,
        ts: u64,
        action: Action,
        pps: Option<u32>,
        exp: Option<u64>,
    ) -> Record {
        let rate = pps.map(|p| Rate {
            class: 1,
            packets_per_sec: p,
        });
        Record {
            key: key(),
            origin,
            host: host(h),
            ts_ms: ts,
            op: Op::Put(Entry::new(action, rate, exp).unwrap()),
        }
    }

    fn del(origin: FleetOrigin, h: u8, ts: u64, hold: Option<u64>) -> Record {
        Record {
            key: key(),
            origin,
            host: host(h),
            ts_ms: ts,
            op: Op::Del { hold_until_ms: hold },
        }
    }

    fn action(s: &KeyState, now: u64) -> Option<(Action, FleetOrigin)> {
        match s.effective(now) {
            Effective::Act { entry, origin, .. } => Some((entry.action, origin)),
            _ => None,
        }
    }

    use FleetOrigin::*;

    #[test]
    fn one_origin_expiring_never_removes_another() {
        let mut s = KeyState::default();
        s.apply(&put(Model, 1, NOW - 10, Action::Block, None, Some(NOW + 1_000)));
        s.apply(&put(
            Fingerprint,
            2,
            NOW - 9,
            Action::Block,
            None,
            Some(NOW + 60_000),
        ));
        // Equal strength: the later expiry is the one shown.
        assert_eq!(action(&s, NOW), Some((Action::Block, Fingerprint)));
        assert_eq!(action(&s, NOW + 2_000), Some((Action::Block, Fingerprint)));
        assert_eq!(action(&s, NOW + 60_000), None);
        assert_eq!(s.relevant_until_ms(0), Some(NOW + 60_000));
    }

    #[test]
    fn operator_beats_model_even_when_weaker() {
        let mut s = KeyState::default();
        s.apply(&put(Model, 1, NOW - 10, Action::Block, None, None));
        s.apply(&put(Operator, 2, NOW - 5, Action::Monitor, None, None));
        assert_eq!(action(&s, NOW), Some((Action::Monitor, Operator)));
        s.apply(&put(Fleet, 3, NOW - 1, Action::Block, None, None));
        assert_eq!(action(&s, NOW), Some((Action::Monitor, Operator)));
        // The operator's entry expiring hands the key back to the strongest automated one.
        let mut s = KeyState::default();
        s.apply(&put(Model, 1, NOW - 10, Action::Block, None, None));
        s.apply(&put(Operator, 2, NOW - 5, Action::Monitor, None, Some(NOW + 5)));
        assert_eq!(action(&s, NOW + 5), Some((Action::Block, Model)));
    }

    #[test]
    fn same_origin_newer_wins_in_either_order() {
        let a = put(Model, 1, NOW - 10, Action::Block, None, None);
        let b = put(Model, 2, NOW - 5, Action::Monitor, None, None);
        for order in [[&a, &b], [&b, &a]] {
            let mut s = KeyState::default();
            for r in order {
                s.apply(r);
            }
            assert_eq!(action(&s, NOW), Some((Action::Monitor, Model)));
        }
        let mut s = KeyState::default();
        s.apply(&b);
        assert_eq!(s.apply(&a), Outcome::Rejected(Stale::Superseded));
        assert_eq!(
            s.apply(&b),
            Outcome::Rejected(Stale::Superseded),
            "a duplicate changes nothing"
        );
    }

    #[test]
    fn unblock_rejects_older_puts_of_any_origin_and_holds_against_the_model() {
        let mut s = KeyState::default();
        s.apply(&put(Operator, 1, NOW - 20, Action::Block, None, None));
        s.apply(&put(Model, 2, NOW - 15, Action::Block, None, None));
        assert_eq!(
            s.apply(&del(Operator, 1, NOW - 10, Some(NOW + 60_000))),
            Outcome::Applied
        );
        assert_eq!(
            s.effective(NOW),
            Effective::Held {
                until_ms: NOW + 60_000
            }
        );
        // A stale replay of the operator's own earlier block, or the model's, cannot come back.
        for r in [
            put(Operator, 1, NOW - 20, Action::Block, None, None),
            put(Model, 3, NOW - 11, Action::Block, None, None),
            put(ListEdit, 0, NOW - 10, Action::Block, None, None),
        ] {
            assert_eq!(s.apply(&r), Outcome::Rejected(Stale::BeforeUnblock), "{r:?}");
        }
        // A newer model block is stored but held off until the hold ends.
        assert_eq!(
            s.apply(&put(Model, 2, NOW - 1, Action::Block, None, None)),
            Outcome::Applied
        );
        assert_eq!(
            s.effective(NOW),
            Effective::Held {
                until_ms: NOW + 60_000
            }
        );
        assert_eq!(action(&s, NOW + 60_000), Some((Action::Block, Model)));
        // A newer operator block acts at once, hold or not.
        s.apply(&put(Operator, 1, NOW, Action::Throttle, Some(10), None));
        assert_eq!(action(&s, NOW + 1), Some((Action::Throttle, Operator)));
    }

    #[test]
    fn model_withdraw_removes_only_its_own_entry() {
        let mut s = KeyState::default();
        s.apply(&put(Model, 1, NOW - 20, Action::Block, None, None));
        s.apply(&put(Fingerprint, 1, NOW - 19, Action::Throttle, Some(5), None));
        s.apply(&del(Model, 1, NOW - 10, None));
        assert_eq!(action(&s, NOW), Some((Action::Throttle, Fingerprint)));
        // The withdrawn put arriving late does not revive it.
        assert_eq!(
            s.apply(&put(Model, 1, NOW - 20, Action::Block, None, None)),
            Outcome::Rejected(Stale::Superseded)
        );
    }

    #[test]
    fn strongest_active_wins() {
        let mut s = KeyState::default();
        s.apply(&put(Model, 1, NOW - 3, Action::Monitor, None, None));
        assert_eq!(action(&s, NOW), Some((Action::Monitor, Model)));
        s.apply(&put(Fingerprint, 1, NOW - 2, Action::Throttle, Some(100), None));
        s.apply(&put(Fleet, 1, NOW - 1, Action::Throttle, Some(20), None));
        match s.effective(NOW) {
            Effective::Act { entry, origin, .. } => {
                assert_eq!(origin, Fleet);
                assert_eq!(entry.rate.unwrap().packets_per_sec, 20, "lowest rate wins");
            }
            other => panic!("{other:?}"),
        }
        s.apply(&put(Model, 1, NOW, Action::Block, None, Some(NOW + 10)));
        assert_eq!(action(&s, NOW), Some((Action::Block, Model)));
        assert_eq!(action(&s, NOW + 10), Some((Action::Throttle, Fleet)));
    }

    /// A random set of records with unique stamps (as the engine guarantees).
    fn random_ops(rng: &mut SmallRng, n: usize) -> Vec<Record> {
        let mut used = std::collections::HashSet::new();
        let mut out = Vec::new();
        while out.len() < n {
            let h = rng.gen_range(1..=3u8);
            let ts = NOW - 100 + rng.gen_range(0..100u64);
            if !used.insert((h, ts)) {
                continue;
            }
            let origin = FleetOrigin::ALL[rng.gen_range(0..FleetOrigin::ALL.len())];
            let exp = match rng.gen_range(0..3) {
                0 => None,
                1 => Some(NOW - 50 + rng.gen_range(0..200)),
                _ => Some(NOW + 1_000_000),
            };
            let r = match rng.gen_range(0..6) {
                0 => put(origin, h, ts, Action::Block, None, exp),
                1 => put(origin, h, ts, Action::Throttle, Some(rng.gen_range(1..50)), exp),
                2 => put(origin, h, ts, Action::Monitor, None, exp),
                3 => del(origin, h, ts, Some(NOW + rng.gen_range(0..100))),
                _ => put(origin, h, ts, Action::Block, None, exp),
            };
            out.push(r);
        }
        out
    }

    /// The state the rules define, computed directly rather than incrementally.
    fn oracle(ops: &[Record]) -> KeyState {
        let tomb = ops
            .iter()
            .filter(|r| r.origin == Operator && matches!(r.op, Op::Del { .. }))
            .max_by_key(|r| Stamp::of(r));
        let mut s = KeyState {
            tombstone: tomb.map(|r| Tombstone {
                stamp: Stamp::of(r),
                hold_until_ms: match r.op {
                    Op::Del { hold_until_ms } => hold_until_ms,
                    Op::Put(_) => unreachable!(),
                },
            }),
            ..KeyState::default()
        };
        for origin in FleetOrigin::ALL {
            let newest = ops
                .iter()
                .filter(|r| r.origin == origin && !(origin == Operator && matches!(r.op, Op::Del { .. })))
                .filter(|r| tomb.is_none_or(|t| Stamp::of(r) > Stamp::of(t)))
                .max_by_key(|r| Stamp::of(r));
            if let Some(r) = newest {
                let stamp = Stamp::of(r);
                let slot = match r.op {
                    Op::Put(entry) => Slot::Put { stamp, entry },
                    Op::Del { .. } => Slot::Withdrawn { stamp },
                };
                s.slots.insert(origin, slot);
            }
        }
        s
    }

    #[test]
    fn any_delivery_order_converges_to_the_oracle() {
        let mut rng = SmallRng::seed_from_u64(12);
        for round in 0..400 {
            let n = rng.gen_range(1..25);
            let ops = random_ops(&mut rng, n);
            let want = oracle(&ops);
            for _ in 0..20 {
                let mut order: Vec<&Record> = ops.iter().collect();
                order.shuffle(&mut rng);
                // Duplicated deliveries (an outbox replay after a stream read) change nothing.
                let dups: Vec<&Record> = order.iter().take(3).copied().collect();
                order.extend(dups);
                let mut s = KeyState::default();
                for r in order {
                    s.apply(r);
                }
                assert_eq!(s, want, "round {round}: {ops:#?}");
                for now in [NOW - 60, NOW, NOW + 60, NOW + 2_000_000] {
                    assert_eq!(s.effective(now), want.effective(now));
                }
            }
        }
    }

    #[test]
    fn snapshot_of_fields_rebuilds_the_same_state() {
        // What Redis stores (one field per slot + the tombstone) read back in any order gives the same state.
        let mut rng = SmallRng::seed_from_u64(7);
        for _ in 0..200 {
            let ops = random_ops(&mut rng, 12);
            let s = oracle(&ops);
            let mut fields: Vec<Record> = Vec::new();
            for (origin, slot) in &s.slots {
                let (stamp, op) = match slot {
                    Slot::Put { stamp, entry } => (stamp, Op::Put(*entry)),
                    Slot::Withdrawn { stamp } => (stamp, Op::Del { hold_until_ms: None }),
                };
                fields.push(Record {
                    key: key(),
                    origin: *origin,
                    host: stamp.host.clone(),
                    ts_ms: stamp.ts_ms,
                    op,
                });
            }
            if let Some(t) = &s.tombstone {
                fields.push(del(Operator, 0, t.stamp.ts_ms, t.hold_until_ms));
                fields.last_mut().unwrap().host = t.stamp.host.clone();
            }
            fields.shuffle(&mut rng);
            let mut back = KeyState::default();
            for f in &fields {
                let decoded = Record::from_hash_field(f.key, f.field(), &f.to_hash_value()).unwrap();
                back.apply(&decoded);
            }
            assert_eq!(back, s);
        }
    }
}

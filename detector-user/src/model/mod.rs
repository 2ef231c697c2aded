//! The behavioural model: observations → features → scores → proposed decisions. Pure: no aya, tokio or I/O.
//!
//! ```text
//! Observation ──observe()──▶ per-source / per-fingerprint / per-prefix state (features.rs)
//!                                      │ scores (score.rs): a source on every request, groups every tick
//!             tick(now, allowlist) ────┴▶ policy (policy.rs): tiers, hysteresis, TTL ──▶ Vec<ProposedDecision>
//! ```
//!
//! The daemon turns kernel events into [`Observation`]s, calls [`Model::observe`] for each and [`Model::tick`]
//! about once a second, and hands the proposed decisions to the enforcer (origin `model`; in dry-run it only logs
//! them). [`Model::explain_source`] & co. answer `aqd explain`, [`Model::top`] answers `aqd top --by score`.
//!
//! A source's score combines its own features with its fingerprint cluster's and its prefix's scores, weighted
//! by how much the source resembles that cluster (same templated sizes, firing in the cluster's bursts): a
//! campaign source doing 0.2 requests/s is only visible through its cluster, while an honest client that
//! merely shares a popular fingerprint does not inherit the cluster's score.
//!
//! Invariants: per-source state is a fixed 136-byte struct in a bounded table (approximate LRU eviction plus
//! idle aging; sources under an active throttle/block are evicted last); times are the monotonic clock of the
//! observations, in ns, and `wall_offset_ns` maps them to wall time (hour of day, release timestamp).

pub mod eval;
mod features;
mod policy;
mod score;
mod strikes;
mod table;
#[cfg(test)]
mod tests;
pub mod train;

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;
use std::time::Duration;

use hashbrown::{HashMap, HashSet};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

pub use features::{GROUP_FEATURES, SOURCE_FEATURES};
pub use policy::{Action, PolicyConfig};
pub use score::{Contribution, DEFAULT_WEIGHTS, LinearSpec, WeightsError, WeightsFile};
pub use strikes::{StrikeScope, Strikes};

use features::{GroupState, GroupView, SourceState, WATCHED};
use score::{Compiled, contributions, top_reasons};
use table::Table;

const NS_PER_S: u64 = 1_000_000_000;
const NS_PER_H: u64 = 3600 * NS_PER_S;
/// Sources looked at per tick by the rescan that follows a cluster becoming suspicious.
const RESCAN_PER_TICK: usize = 65_536;

/// A client fingerprint: clients sharing a TLS library (JA4) and a TCP stack (SYN signature).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FingerprintId {
    pub ja4: Option<Arc<str>>,
    /// The kernel's SYN-signature key (0 when unknown).
    pub syn_key: u64,
}

impl FingerprintId {
    /// The compact key the observations carry (FNV-1a over both parts; 0 is reserved for "unknown").
    pub fn key(&self) -> FpKey {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |b: u8| {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        };
        if let Some(j) = &self.ja4 {
            j.bytes().for_each(&mut eat);
        }
        eat(0xff);
        self.syn_key.to_le_bytes().into_iter().for_each(&mut eat);
        FpKey(if h == 0 { 1 } else { h })
    }
}

impl std::fmt::Display for FingerprintId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{:016x}", self.ja4.as_deref().unwrap_or("-"), self.syn_key)
    }
}

/// The key of a fingerprint in observations; [`FpKey::UNKNOWN`] when the connection has none (yet).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FpKey(pub u64);

impl FpKey {
    pub const UNKNOWN: FpKey = FpKey(0);
}

/// What the model learns from the kernel's event stream. `time_ns` is the monotonic clock (the kernel's
/// `bpf_ktime_get_ns`); `flow` identifies the connection.
#[derive(Clone, Debug, PartialEq)]
pub enum Observation {
    ConnOpen {
        time_ns: u64,
        src: IpAddr,
        flow: u64,
        fp: FpKey,
    },
    /// One burst of client payload after an idle gap.
    Request {
        time_ns: u64,
        src: IpAddr,
        flow: u64,
        fp: FpKey,
        bytes: u32,
        packets: u16,
    },
    ConnClose {
        time_ns: u64,
        src: IpAddr,
        flow: u64,
        fp: FpKey,
        requests: u32,
        client_bytes: u64,
        server_bytes_est: u64,
    },
}

impl Observation {
    pub fn time_ns(&self) -> u64 {
        match *self {
            Observation::ConnOpen { time_ns, .. }
            | Observation::Request { time_ns, .. }
            | Observation::ConnClose { time_ns, .. } => time_ns,
        }
    }
}

/// What a decision applies to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", content = "value", rename_all = "lowercase")]
pub enum Scope {
    Source(IpAddr),
    /// The source's /24 (IPv4) or /64 (IPv6).
    Prefix(IpNet),
    /// Every source presenting this fingerprint.
    Fingerprint(FingerprintId),
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scope::Source(a) => write!(f, "{a}"),
            Scope::Prefix(n) => write!(f, "{n}"),
            Scope::Fingerprint(id) => write!(f, "fp:{id}"),
        }
    }
}

/// A decision the model proposes; the caller enforces it (origin `model`) or, in dry-run, only logs it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProposedDecision {
    pub scope: Scope,
    pub action: Action,
    pub ttl: Duration,
    pub score: f64,
    /// Short and human: tier, score and the largest contributions.
    pub reason: String,
    /// True when this only extends a decision the model already proposed.
    pub refresh: bool,
}

/// Addresses and networks the model must never propose decisions against (the allowlist and the management
/// networks). The daemon implements it over its lists; `()` allows nothing, a slice of networks allows those.
pub trait Allowlist {
    fn allows(&self, addr: IpAddr) -> bool;
    /// Whether any address inside `net` is allowed (then no prefix decision is proposed for it).
    fn allows_any_in(&self, net: &IpNet) -> bool;
}

impl Allowlist for () {
    fn allows(&self, _: IpAddr) -> bool {
        false
    }
    fn allows_any_in(&self, _: &IpNet) -> bool {
        false
    }
}

impl Allowlist for Vec<IpNet> {
    fn allows(&self, addr: IpAddr) -> bool {
        self.as_slice().allows(addr)
    }
    fn allows_any_in(&self, net: &IpNet) -> bool {
        self.as_slice().allows_any_in(net)
    }
}

impl Allowlist for [IpNet] {
    fn allows(&self, addr: IpAddr) -> bool {
        self.iter().any(|n| n.contains(&addr))
    }
    fn allows_any_in(&self, net: &IpNet) -> bool {
        self.iter().any(|n| n.contains(net) || net.contains(n))
    }
}

/// Model settings (serde, every field defaulted).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// Tracked sources at most (LRU beyond); ≤ 256 bytes each including the index.
    pub max_sources: usize,
    pub max_prefixes: usize,
    pub max_fingerprints: usize,
    /// Reserve the full tables up front (no rehash pauses; the memory report shows the real footprint).
    pub prealloc: bool,
    /// Wall-clock ns = observation ns + this (CLOCK_REALTIME − CLOCK_MONOTONIC at start).
    pub wall_offset_ns: i64,
    /// A model release (Unix seconds): growth after it is a feature for `release_window_s`.
    pub release_unix_s: Option<i64>,
    pub release_window_s: u32,
    /// Groups first seen within this long after the model starts are not "novel".
    pub warmup_s: u32,
    /// Sources / groups idle this long are dropped.
    pub source_idle_s: u32,
    pub group_idle_s: u32,
    /// A prefix needs this many active sources before it can be throttled or blocked as a whole.
    pub min_prefix_sources: u32,
    /// A cluster (fingerprint or prefix) passes its score on to its members only from this many active sources
    /// on (fully from 4×).
    pub cluster_min_sources: u32,
    /// Fingerprint clusters are throttled at most (never blocked: their members include unseen clients) ...
    pub fingerprint_max_action: Action,
    /// ... and only when this share of their traffic comes from members that look like the cluster.
    pub fingerprint_min_purity: f32,
    /// Active sources a pure fingerprint cluster needs before a decision at fingerprint scope may exceed monitor
    /// (kept apart from `cluster_min_sources`: members inherit from 25 sources, fully from 100, but a pure cluster
    /// of 40 is acted on as a whole, which decides a new hydra's members on their first request).
    pub fingerprint_min_sources: u32,
    /// Decisions kept for `explain` (all scopes).
    pub history_len: usize,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            max_sources: 1_000_000,
            max_prefixes: 262_144,
            max_fingerprints: 65_536,
            prealloc: false,
            wall_offset_ns: 0,
            release_unix_s: None,
            release_window_s: 86_400,
            warmup_s: 600,
            source_idle_s: 3600,
            group_idle_s: 7200,
            min_prefix_sources: 4,
            cluster_min_sources: 25,
            fingerprint_min_sources: 40,
            fingerprint_max_action: Action::Throttle,
            fingerprint_min_purity: 0.9,
            history_len: 10_000,
        }
    }
}

/// One decision in the history kept for `explain`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// Monotonic seconds.
    pub time_s: u64,
    pub scope: Scope,
    pub action: Action,
    pub ttl_s: u32,
    pub score: f64,
    pub reason: String,
    pub refresh: bool,
}

/// A score and where it comes from (`aqd explain --json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Explanation {
    pub scope: Scope,
    pub score: f64,
    /// Log-odds before any feature.
    pub bias: f64,
    /// Sorted by |contribution|.
    pub features: Vec<Contribution>,
    /// The tier in force, if any, and for how much longer.
    pub tier: Option<Action>,
    pub expires_in_s: Option<u64>,
    pub strikes: u8,
    /// For a source: its fingerprint cluster and prefix, with their scores.
    pub related: Vec<(Scope, f64)>,
    pub history: Vec<HistoryEntry>,
    /// Why it is not blocked (absent when it is).
    pub why_not_blocked: Option<String>,
}

/// One row of `aqd top --by score`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Scored {
    pub scope: Scope,
    pub score: f64,
    pub tier: Option<Action>,
}

/// Which kind of entity to rank (by name on the control socket: `source`, `prefix`, `fingerprint`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    #[serde(alias = "sources")]
    Source,
    #[serde(alias = "prefixes")]
    Prefix,
    #[serde(alias = "fingerprints", alias = "fp")]
    Fingerprint,
}

/// Bytes held by the model.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MemoryReport {
    pub sources: usize,
    pub source_bytes: usize,
    /// source_bytes / max(sources, 1): index buckets, control bytes and state, incl. unused reserved capacity.
    pub bytes_per_source: f64,
    pub prefixes: usize,
    pub prefix_bytes: usize,
    pub fingerprints: usize,
    pub fingerprint_bytes: usize,
    /// Watch set, fingerprint names, history.
    pub other_bytes: usize,
    pub total_bytes: usize,
    pub evicted_sources: u64,
}

/// Counters for metrics.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ModelStats {
    pub observations: u64,
    pub requests: u64,
    /// Proposed decisions (incl. refreshes) by action: monitor, throttle, block.
    pub decisions: [u64; 3],
}

type Key = [u8; 16];

fn addr_key(a: IpAddr) -> Key {
    match a {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn key_addr(k: &Key) -> IpAddr {
    Ipv6Addr::from(*k).to_canonical()
}

fn prefix_key(a: IpAddr) -> Key {
    let mut k = addr_key(a);
    match a {
        IpAddr::V4(_) => k[15] = 0,
        IpAddr::V6(_) => k[8..].fill(0),
    }
    k
}

fn key_net(k: &Key) -> IpNet {
    match key_addr(k) {
        IpAddr::V4(a) => IpNet::V4(Ipv4Net::new(a, 24).expect("24 is a valid length")),
        IpAddr::V6(a) => IpNet::V6(Ipv6Net::new(a, 64).expect("64 is a valid length")),
    }
}

/// The prefix a source is grouped under (/24 or /64).
pub fn prefix_of(a: IpAddr) -> IpNet {
    key_net(&prefix_key(a))
}

/// The behavioural model. Single-threaded; the daemon owns it in one task.
pub struct Model {
    cfg: ModelConfig,
    weights: WeightsFile,
    w: Compiled,
    sources: Table<Key, SourceState>,
    prefixes: Table<Key, GroupState>,
    fps: Table<u64, GroupState>,
    fp_names: HashMap<u64, FingerprintId>,
    watch: HashSet<Key>,
    history: VecDeque<HistoryEntry>,
    start_ns: Option<u64>,
    release_ns: Option<u64>,
    release_snapshot: bool,
    last_rescan_ns: u64,
    rescan_left: usize,
    rescan_cursor: usize,
    cursors: [usize; 3],
    stats: ModelStats,
}

impl Model {
    /// A model with the shipped weights.
    pub fn new(cfg: ModelConfig) -> Self {
        Self::with_weights(cfg, WeightsFile::shipped()).expect("the shipped weights compile")
    }

    pub fn with_weights(cfg: ModelConfig, weights: WeightsFile) -> Result<Self, WeightsError> {
        let w = weights.compile()?;
        let release_ns = cfg.release_unix_s.map(|r| {
            let r_ns = (r as i128) * NS_PER_S as i128 - cfg.wall_offset_ns as i128;
            r_ns.clamp(0, u64::MAX as i128) as u64
        });
        Ok(Model {
            sources: Table::new(cfg.max_sources, cfg.prealloc),
            // Group tables are not reserved up front even with `prealloc`: a few thousand live groups spread over
            // an index sized for 262,144 missed the cache on every lookup (twice per request); they grow instead.
            prefixes: Table::new(cfg.max_prefixes, false),
            fps: Table::new(cfg.max_fingerprints, false),
            fp_names: HashMap::new(),
            watch: HashSet::new(),
            history: VecDeque::new(),
            start_ns: None,
            release_ns,
            release_snapshot: false,
            last_rescan_ns: 0,
            rescan_left: 0,
            rescan_cursor: 0,
            cursors: [0; 3],
            stats: ModelStats::default(),
            cfg,
            weights,
            w,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn weights(&self) -> &WeightsFile {
        &self.weights
    }

    pub fn stats(&self) -> &ModelStats {
        &self.stats
    }

    /// Registers a fingerprint's full identity (for decisions and `explain`) and returns its key.
    pub fn intern(&mut self, id: FingerprintId) -> FpKey {
        let k = id.key();
        if self.fp_names.len() >= 4 * self.cfg.max_fingerprints {
            let fps = &self.fps;
            self.fp_names.retain(|k, _| fps.get(k).is_some());
        }
        self.fp_names.entry(k.0).or_insert(id);
        k
    }

    fn fp_id(&self, k: u64) -> FingerprintId {
        self.fp_names.get(&k).cloned().unwrap_or(FingerprintId {
            ja4: None,
            syn_key: k,
        })
    }

    #[inline]
    fn hour(&self, t_ns: u64) -> u32 {
        let wall = t_ns as i128 + self.cfg.wall_offset_ns as i128;
        (wall.max(0) / NS_PER_H as i128) as u32
    }

    /// Feeds one observation.
    pub fn observe(&mut self, obs: &Observation) {
        self.stats.observations += 1;
        let t = obs.time_ns();
        if self.start_ns.is_none() {
            self.start_ns = Some(t);
        }
        match *obs {
            Observation::ConnOpen { src, fp, .. } => {
                let s = self
                    .sources
                    .get_or_insert(addr_key(src), t, || SourceState::new(t, fp.0));
                s.advance(t);
                s.open = s.open.saturating_add(1);
            }
            Observation::ConnClose { src, fp, .. } => {
                let s = self
                    .sources
                    .get_or_insert(addr_key(src), t, || SourceState::new(t, fp.0));
                s.advance(t);
                s.open = s.open.saturating_sub(1);
            }
            Observation::Request { src, fp, bytes, .. } => self.request(t, src, fp, bytes),
        }
    }

    fn request(&mut self, t: u64, src: IpAddr, fp: FpKey, bytes: u32) {
        self.stats.requests += 1;
        let key = addr_key(src);
        let hour = self.hour(t);
        let after_release = self.release_ns.is_some_and(|r| t >= r);
        let min = self.cfg.cluster_min_sources as f32;
        let bucket = features::size_bucket(bytes);
        let s = self.sources.get_or_insert(key, t, || SourceState::new(t, fp.0));
        if fp != FpKey::UNKNOWN {
            s.fp = fp.0;
        }
        let (first_slot, first_epoch) = s.request(t, bytes, hour);
        let regularity = s.regularity();
        // A scheduled burster's coactivity is its schedule: its groups' member coactivity counts it only in
        // proportion to 1 − scheduled_bursts, as its own features do.
        let sched_keep = 1.0 - s.scheduled_bursts(t as f32 * 1e-9 - s.first_s as f32);
        let mut fpv = GroupView::default();
        if s.fp != 0 {
            let g = self.fps.get_or_insert(s.fp, t, || GroupState::new(t));
            let others = g.request(t, bytes, hour, first_slot, first_epoch, after_release);
            let mut x = 0.0;
            if first_slot {
                x = ((others as f32 + 1.0) / (g.expected_others() + 1.0)).ln();
                if g.coact_ready() {
                    s.coact_sample(x);
                }
            }
            g.purity_sample(bucket, x);
            fpv = g.view(min);
            g.member_sample(regularity, s.coact * sched_keep);
        }
        let p = self
            .prefixes
            .get_or_insert(prefix_key(src), t, || GroupState::new(t));
        let others = p.request(t, bytes, hour, first_slot, first_epoch, after_release);
        if first_slot && s.fp == 0 && p.coact_ready() {
            s.coact_sample(((others as f32 + 1.0) / (p.expected_others() + 1.0)).ln());
        }
        p.member_sample(regularity, s.coact * sched_keep);
        // Scored at most once per 1 s slot: decisions are taken once a second (tick), so scoring every request of
        // a busy source would only repeat the work; a source is scored on its first request in every slot.
        if !first_slot {
            return;
        }
        let pv = p.view(min);
        let x = s.features(t, hour, &fpv, &pv);
        let z = source_score_with(&self.w, &self.weights.policy, &x);
        s.score = z;
        if z >= self.weights.policy.monitor_enter && s.flags & WATCHED == 0 {
            s.flags |= WATCHED;
            self.watch.insert(key);
        }
    }

    fn release_at(&self, now_ns: u64) -> Option<(u32, f32)> {
        let r = self.release_ns?;
        if now_ns < r {
            return None;
        }
        let since = (now_ns - r) as f32 * 1e-9;
        (since <= self.cfg.release_window_s as f32).then_some(((r / NS_PER_S) as u32, since))
    }

    fn warm_end_s(&self) -> u32 {
        (self.start_ns.unwrap_or(0) / NS_PER_S) as u32 + self.cfg.warmup_s
    }

    fn group_features(&self, g: &GroupState, now_ns: u64) -> [f32; features::NG] {
        g.features(
            now_ns,
            self.hour(now_ns),
            self.warm_end_s(),
            self.release_at(now_ns),
        )
    }

    fn source_features(&self, key: &Key, s: &SourceState, now_ns: u64) -> [f32; features::NS] {
        let min = self.cfg.cluster_min_sources as f32;
        let fpv = if s.fp != 0 {
            self.fps.get(&s.fp).map(|g| g.view(min)).unwrap_or_default()
        } else {
            GroupView::default()
        };
        let pv = self
            .prefixes
            .get(&prefix_key(key_addr(key)))
            .map(|g| g.view(min))
            .unwrap_or_default();
        s.features(now_ns, self.hour(now_ns), &fpv, &pv)
    }

    /// A source's score: the logistic model's, raised by the single-source tool rule when its sustained,
    /// templated, regular volume exceeds the calibrated bound (`PolicyConfig::tool_sustained_templated`):
    /// σ(throttle logit + 4 × excess), so a clear excess reaches the block threshold.
    fn source_score(&self, x: &[f32; features::NS]) -> f32 {
        source_score_with(&self.w, &self.weights.policy, x)
    }

    fn source_reasons(&self, x: &[f32; features::NS]) -> String {
        let why = top_reasons(&self.w.source, x, &SOURCE_FEATURES, 3);
        let v = x[features::SUSTAINED_TEMPLATED];
        let bound = self.weights.policy.tool_sustained_templated;
        if v >= bound {
            format!("single-source tool rule: sustained_templated {v:.2} ≥ {bound:.2}; {why}")
        } else {
            why
        }
    }

    /// Whether the source's fingerprint cluster or prefix scores at least `level` (what a rescan looks for).
    fn in_flagged_group(&self, key: &Key, s: &SourceState, level: f32) -> bool {
        (s.fp != 0 && self.fps.get(&s.fp).is_some_and(|g| g.score >= level))
            || self
                .prefixes
                .get(&prefix_key(key_addr(key)))
                .is_some_and(|g| g.score >= level)
    }

    fn record(&mut self, now_ns: u64, d: &ProposedDecision, out: &mut Vec<ProposedDecision>) {
        self.stats.decisions[d.action as usize - 1] += 1;
        if self.cfg.history_len > 0 {
            if self.history.len() >= self.cfg.history_len {
                self.history.pop_front();
            }
            self.history.push_back(HistoryEntry {
                time_s: now_ns / NS_PER_S,
                scope: d.scope.clone(),
                action: d.action,
                ttl_s: d.ttl.as_secs() as u32,
                score: d.score,
                reason: d.reason.clone(),
                refresh: d.refresh,
            });
        }
        out.push(d.clone());
    }

    /// Re-scores groups and watched sources at `now_ns`, ages idle state, and returns the decisions to propose.
    /// Call about once a second. Nothing is proposed against what `allow` allows.
    pub fn tick(&mut self, now_ns: u64, allow: &dyn Allowlist) -> Vec<ProposedDecision> {
        let mut out = Vec::new();
        if self.start_ns.is_none() {
            self.start_ns = Some(now_ns);
        }
        let now_s = (now_ns / NS_PER_S) as u32;
        let pcfg = self.weights.policy.clone();

        // Release baseline: each group's rate just before the release.
        if let Some(r) = self.release_ns
            && !self.release_snapshot
            && now_ns >= r
        {
            self.release_snapshot = true;
            for (_, g) in self.fps.iter_mut() {
                g.pre_release = g.slow_rate(r.max(g.last_ns));
            }
            for (_, g) in self.prefixes.iter_mut() {
                g.pre_release = g.slow_rate(r.max(g.last_ns));
            }
        }

        // Groups: refresh and score; decisions for clusters that qualify.
        let mut newly_flagged = false;
        let hour = self.hour(now_ns);
        let warm = self.warm_end_s();
        let rel = self.release_at(now_ns);
        let mut group_decisions: Vec<(Scope, f32, String, policy::Step)> = Vec::new();
        for (k, g) in self.fps.iter_mut() {
            g.refresh(now_ns);
            let x = g.features(now_ns, hour, warm, rel);
            let z = self.w.fingerprint.score(&x);
            if z >= pcfg.monitor_enter && g.score < pcfg.monitor_enter {
                newly_flagged = true;
            }
            g.score = z;
            let pure = g.purity() >= self.cfg.fingerprint_min_purity;
            let big = g.active_sources() >= self.cfg.fingerprint_min_sources as f32;
            let max_tier = if pure && big {
                self.cfg.fingerprint_max_action as u8
            } else {
                1
            };
            if g.active_sources() < 2.0 && g.policy.current(now_s) == 0 {
                continue;
            }
            if let Some(step) = g.policy.step(z, now_s, &pcfg, max_tier) {
                let why = top_reasons(&self.w.fingerprint, &x, &GROUP_FEATURES, 3);
                group_decisions.push((
                    Scope::Fingerprint(FingerprintId {
                        ja4: None,
                        syn_key: *k,
                    }),
                    z,
                    why,
                    step,
                ));
            }
        }
        for (k, g) in self.prefixes.iter_mut() {
            g.refresh(now_ns);
            let x = g.features(now_ns, hour, warm, rel);
            let z = self.w.prefix.score(&x);
            if z >= pcfg.monitor_enter && g.score < pcfg.monitor_enter {
                newly_flagged = true;
            }
            g.score = z;
            let net = key_net(k);
            if allow.allows_any_in(&net) {
                continue;
            }
            let max_tier = if g.active_sources() >= self.cfg.min_prefix_sources as f32 {
                3
            } else {
                1
            };
            if g.active_sources() < 2.0 && g.policy.current(now_s) == 0 {
                continue;
            }
            if let Some(step) = g.policy.step(z, now_s, &pcfg, max_tier) {
                let why = top_reasons(&self.w.prefix, &x, &GROUP_FEATURES, 3);
                group_decisions.push((Scope::Prefix(net), z, why, step));
            }
        }
        for (scope, z, why, step) in group_decisions {
            let scope = match scope {
                Scope::Fingerprint(id) => Scope::Fingerprint(self.fp_id(id.syn_key)),
                s => s,
            };
            let d = ProposedDecision {
                reason: format!("{} {:.2}: {}", step.action, z, why),
                scope,
                action: step.action,
                ttl: Duration::from_secs(step.ttl_s as u64),
                score: z as f64,
                refresh: step.refresh,
            };
            self.record(now_ns, &d, &mut out);
        }

        // A cluster just became suspicious: look at its known members now rather than at their next request. The
        // sweep is bounded per tick (a full pass over a million sources took ~100 ms inside one tick); members
        // that request meanwhile are scored with the new cluster score anyway.
        if newly_flagged && now_ns.saturating_sub(self.last_rescan_ns) >= 5 * NS_PER_S {
            self.last_rescan_ns = now_ns;
            self.rescan_left = self.sources.len();
        }
        if self.rescan_left > 0 {
            let n = self.rescan_left.min(RESCAN_PER_TICK).min(self.sources.len());
            self.rescan_left -= n;
            for _ in 0..n {
                if self.rescan_cursor >= self.sources.len() {
                    self.rescan_cursor = 0;
                }
                let i = self.rescan_cursor;
                self.rescan_cursor += 1;
                let Some((k, s)) = self.sources.at(i) else { break };
                if s.flags & WATCHED != 0 || !self.in_flagged_group(k, s, pcfg.monitor_enter) {
                    continue;
                }
                let x = self.source_features(k, s, now_ns);
                if self.source_score(&x) >= pcfg.monitor_enter {
                    let k = *k;
                    if let Some((_, s)) = self.sources.at_mut(i) {
                        s.flags |= WATCHED;
                    }
                    self.watch.insert(k);
                }
            }
        }

        // Watched sources.
        let keys: Vec<Key> = self.watch.iter().copied().collect();
        for k in keys {
            let Some(s) = self.sources.get(&k) else {
                self.watch.remove(&k);
                continue;
            };
            let addr = key_addr(&k);
            if allow.allows(addr) {
                self.watch.remove(&k);
                if let Some(s) = self.sources.get_mut(&k) {
                    s.flags &= !WATCHED;
                }
                continue;
            }
            let x = self.source_features(&k, s, now_ns);
            let z = self.source_score(&x);
            let s = self.sources.get_mut(&k).expect("present above");
            s.score = z;
            let step = s.policy.step(z, now_s, &pcfg, 3);
            if s.policy.current(now_s) == 0 && z < pcfg.monitor_leave {
                s.flags &= !WATCHED;
                self.watch.remove(&k);
            }
            if let Some(step) = step {
                let d = ProposedDecision {
                    scope: Scope::Source(addr),
                    action: step.action,
                    ttl: Duration::from_secs(step.ttl_s as u64),
                    score: z as f64,
                    reason: format!("{} {:.2}: {}", step.action, z, self.source_reasons(&x)),
                    refresh: step.refresh,
                };
                self.record(now_ns, &d, &mut out);
            }
        }

        // Aging: a slice of each table per tick.
        let src_cut = now_ns.saturating_sub(self.cfg.source_idle_s as u64 * NS_PER_S);
        let grp_cut = now_ns.saturating_sub(self.cfg.group_idle_s as u64 * NS_PER_S);
        let budget = |n: usize| (n / 60).max(1024);
        let b = budget(self.sources.len());
        self.sources.age(src_cut, now_ns, &mut self.cursors[0], b);
        let b = budget(self.prefixes.len());
        self.prefixes.age(grp_cut, now_ns, &mut self.cursors[1], b);
        let b = budget(self.fps.len());
        self.fps.age(grp_cut, now_ns, &mut self.cursors[2], b);
        out
    }

    /// The highest-scoring entities of one kind (scores as of their last request or tick).
    pub fn top(&self, kind: Kind, n: usize, now_ns: u64) -> Vec<Scored> {
        let now_s = (now_ns / NS_PER_S) as u32;
        let mut v: Vec<Scored> = match kind {
            Kind::Source => self
                .sources
                .iter()
                .map(|(k, s)| Scored {
                    scope: Scope::Source(key_addr(k)),
                    score: s.score as f64,
                    tier: Action::from_u8(s.policy.current(now_s)),
                })
                .collect(),
            Kind::Prefix => self
                .prefixes
                .iter()
                .map(|(k, g)| Scored {
                    scope: Scope::Prefix(key_net(k)),
                    score: g.score as f64,
                    tier: Action::from_u8(g.policy.current(now_s)),
                })
                .collect(),
            Kind::Fingerprint => self
                .fps
                .iter()
                .map(|(k, g)| Scored {
                    scope: Scope::Fingerprint(self.fp_id(*k)),
                    score: g.score as f64,
                    tier: Action::from_u8(g.policy.current(now_s)),
                })
                .collect(),
        };
        let n = n.min(v.len());
        if n == 0 {
            return Vec::new();
        }
        v.select_nth_unstable_by(n - 1, |a, b| b.score.total_cmp(&a.score));
        v.truncate(n);
        v.sort_by(|a, b| b.score.total_cmp(&a.score));
        v
    }

    fn history_of(&self, scope: &Scope) -> Vec<HistoryEntry> {
        self.history
            .iter()
            .filter(|h| &h.scope == scope)
            .cloned()
            .collect()
    }

    fn why_not(
        &self,
        z: f32,
        tier: u8,
        p: &policy::PolicyState,
        now_s: u32,
        cap: Option<&str>,
    ) -> Option<String> {
        let c = &self.weights.policy;
        if let Some(cap) = cap {
            return Some(cap.to_string());
        }
        if tier == 3 {
            return None;
        }
        Some(if z < c.block_enter {
            format!(
                "score {z:.3} is below the block threshold {:.3} (throttle at {:.3}, monitor at {:.3})",
                c.block_enter, c.throttle_enter, c.monitor_enter
            )
        } else if p.above_since_s != 0 {
            let need = c.block_after_s >> p.strikes.saturating_sub(1).min(8);
            format!(
                "score {z:.3} has been above the block threshold for {} s of the {need} s required",
                now_s.saturating_sub(p.above_since_s)
            )
        } else {
            format!(
                "score {z:.3} reached the block threshold only now; it must hold for {} s",
                c.block_after_s
            )
        })
    }

    /// Why a source scores what it does. `None` when the source is not tracked.
    pub fn explain_source(&self, addr: IpAddr, now_ns: u64, allow: &dyn Allowlist) -> Option<Explanation> {
        let k = addr_key(addr);
        let s = self.sources.get(&k)?;
        let x = self.source_features(&k, s, now_ns);
        let z = self.source_score(&x);
        let now_s = (now_ns / NS_PER_S) as u32;
        let tier = s.policy.current(now_s);
        let mut related = vec![];
        if s.fp != 0
            && let Some(g) = self.fps.get(&s.fp)
        {
            related.push((Scope::Fingerprint(self.fp_id(s.fp)), g.score as f64));
        }
        if let Some(g) = self.prefixes.get(&prefix_key(addr)) {
            related.push((Scope::Prefix(prefix_of(addr)), g.score as f64));
        }
        let cap = allow
            .allows(addr)
            .then_some("allowlisted: the model never proposes decisions against it");
        Some(Explanation {
            scope: Scope::Source(addr),
            score: z as f64,
            bias: self.w.source.bias as f64,
            features: contributions(&self.w.source, &x, &SOURCE_FEATURES),
            tier: Action::from_u8(tier),
            expires_in_s: (tier > 0).then(|| (s.policy.until_s - now_s) as u64),
            strikes: s.policy.strikes,
            related,
            history: self.history_of(&Scope::Source(addr)),
            why_not_blocked: self.why_not(z, tier, &s.policy, now_s, cap),
        })
    }

    fn explain_group(
        &self,
        scope: Scope,
        g: &GroupState,
        fp: bool,
        now_ns: u64,
        cap: Option<String>,
    ) -> Explanation {
        let x = self.group_features(g, now_ns);
        let lin = if fp { &self.w.fingerprint } else { &self.w.prefix };
        let z = lin.score(&x);
        let now_s = (now_ns / NS_PER_S) as u32;
        let tier = g.policy.current(now_s);
        Explanation {
            history: self.history_of(&scope),
            scope,
            score: z as f64,
            bias: lin.bias as f64,
            features: contributions(lin, &x, &GROUP_FEATURES),
            tier: Action::from_u8(tier),
            expires_in_s: (tier > 0).then(|| (g.policy.until_s - now_s) as u64),
            strikes: g.policy.strikes,
            related: vec![],
            why_not_blocked: self.why_not(z, tier, &g.policy, now_s, cap.as_deref()),
        }
    }

    /// Why a fingerprint cluster scores what it does.
    pub fn explain_fingerprint(&self, fp: FpKey, now_ns: u64) -> Option<Explanation> {
        let g = self.fps.get(&fp.0)?;
        let cap = if g.purity() < self.cfg.fingerprint_min_purity {
            format!(
                "fingerprint clusters are at most monitored unless {:.0}% of their traffic looks like the cluster \
                 (now {:.0}%); members are throttled or blocked one by one",
                self.cfg.fingerprint_min_purity * 100.0,
                g.purity() * 100.0
            )
        } else {
            format!(
                "fingerprint clusters are never blocked (at most {})",
                self.cfg.fingerprint_max_action
            )
        };
        Some(self.explain_group(Scope::Fingerprint(self.fp_id(fp.0)), g, true, now_ns, Some(cap)))
    }

    /// Why a prefix (any address inside it) scores what it does.
    pub fn explain_prefix(&self, addr: IpAddr, now_ns: u64, allow: &dyn Allowlist) -> Option<Explanation> {
        let g = self.prefixes.get(&prefix_key(addr))?;
        let net = prefix_of(addr);
        let cap = if allow.allows_any_in(&net) {
            Some("the prefix holds allowlisted addresses".to_string())
        } else if g.active_sources() < self.cfg.min_prefix_sources as f32 {
            Some(format!(
                "{} active sources; a prefix needs {} before it is throttled or blocked as a whole",
                g.active_sources(),
                self.cfg.min_prefix_sources
            ))
        } else {
            None
        };
        Some(self.explain_group(Scope::Prefix(net), g, false, now_ns, cap))
    }

    /// Bytes held, per table.
    pub fn memory_report(&self) -> MemoryReport {
        let source_bytes = self.sources.allocated_bytes();
        let prefix_bytes = self.prefixes.allocated_bytes();
        let fingerprint_bytes = self.fps.allocated_bytes();
        let names: usize = self.fp_names.allocation_size()
            + self
                .fp_names
                .values()
                .map(|id| id.ja4.as_ref().map_or(0, |j| j.len() + 16))
                .sum::<usize>();
        let other_bytes = self.watch.allocation_size()
            + names
            + self.history.capacity() * std::mem::size_of::<HistoryEntry>()
            + self.history.iter().map(|h| h.reason.capacity()).sum::<usize>();
        MemoryReport {
            sources: self.sources.len(),
            source_bytes,
            bytes_per_source: source_bytes as f64 / self.sources.len().max(1) as f64,
            prefixes: self.prefixes.len(),
            prefix_bytes,
            fingerprints: self.fps.len(),
            fingerprint_bytes,
            other_bytes,
            total_bytes: source_bytes + prefix_bytes + fingerprint_bytes + other_bytes,
            evicted_sources: self.sources.evicted,
        }
    }

    /// Feature vectors of every entity active within the last minute, at `now_ns` (training and tests).
    pub(crate) fn snapshot(&self, now_ns: u64) -> Snapshot {
        let recent = |last: u64| now_ns.saturating_sub(last) <= 60 * NS_PER_S;
        Snapshot {
            sources: self
                .sources
                .iter()
                .filter(|(_, s)| recent(s.last_ns))
                .map(|(k, s)| (key_addr(k), self.source_features(k, s, now_ns).to_vec()))
                .collect(),
            fingerprints: self
                .fps
                .iter()
                .filter(|(_, g)| recent(g.last_ns))
                .map(|(k, g)| (*k, self.group_features(g, now_ns).to_vec(), g.active_sources()))
                .collect(),
            prefixes: self
                .prefixes
                .iter()
                .filter(|(_, g)| recent(g.last_ns))
                .map(|(k, g)| {
                    (
                        key_net(k),
                        self.group_features(g, now_ns).to_vec(),
                        g.active_sources(),
                    )
                })
                .collect(),
        }
    }
}

/// Feature vectors at one instant (groups with their active-source count).
pub(crate) struct Snapshot {
    pub sources: Vec<(IpAddr, Vec<f32>)>,
    pub fingerprints: Vec<(u64, Vec<f32>, f32)>,
    pub prefixes: Vec<(IpNet, Vec<f32>, f32)>,
}

fn source_score_with(w: &Compiled, p: &PolicyConfig, x: &[f32; features::NS]) -> f32 {
    let z = w.source.score(x);
    let excess = x[features::SUSTAINED_TEMPLATED] - p.tool_sustained_templated;
    if excess >= 0.0 {
        let t = p.throttle_enter.clamp(1e-6, 1.0 - 1e-6);
        let base = (t / (1.0 - t)).ln();
        z.max(score::sigmoid(base + 4.0 * excess))
    } else {
        z
    }
}

#[doc(hidden)]
pub fn size_of_source_state() -> usize {
    std::mem::size_of::<(Key, SourceState)>()
}

//! The evaluation harness: generates a scenario's observation stream on a simulated clock, drives the real
//! [`Model`](super::Model) with it (ticking once per simulated second), and reports per population how many
//! sources were throttled or blocked and how fast, side by side with a naive per-IP leaky bucket (capacity 40,
//! one leak per 0.5 s, overflow = blocked; CrowdSec's `http-crawl-non_statics`).
//!
//! Closed loop ([`run_closed`], what `cargo xtask eval` prints): decisions act on the simulated traffic the way
//! the kernel enforces them — a blocked address's requests fail, a throttled one's meet the scenario's rate class
//! (per-address GCRA over packets and new connections: refused, or delayed and refused beyond `max_delay`) — and
//! populations with an `adapt` table react (rotate to fresh addresses, slow down, change fingerprint, pause). The
//! naive baseline gets its own closed-loop pass (its blocks enforced the same way). Open loop ([`run`], used by
//! training): decisions are only recorded. Deterministic for a given seed.

pub mod families;
pub mod scenario;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use ipnet::IpNet;
use serde::Serialize;

use super::{Action, FingerprintId, FpKey, Model, ModelConfig, Observation, Scope, WeightsFile, prefix_of};
pub use scenario::{Label, Population, Reaction, Scenario, ScenarioError, Sizes, Timing};

/// Scenario t = 0 on the monotonic clock the model sees (non-zero, like a real uptime).
const MONO0_NS: u64 = 1_000 * 1_000_000_000;
/// 2026-03-02T00:00:00Z.
const DAY0_UNIX_S: i64 = 1_772_409_600;
/// Decisions within this long of the population start count as "fast".
pub const FAST_S: f64 = 10.0;

/// A small deterministic PRNG (SplitMix64): the harness must not change with a dependency's version.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x5851_f42d_4c95_7f2d)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn exp(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.f64()).ln()
    }
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.f64();
        let u2 = self.f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// The fingerprint of a named client profile (JA4 strings of the real clients where known; made up otherwise).
pub fn profile(name: &str) -> FingerprintId {
    let ja4 = match name {
        "chrome" => "t13d1516h2_8daaf6152771_d8a2da3f94cd",
        "firefox" => "t13d1715h2_5b57614c22b0_3d5424432f57",
        "safari" => "t13d2014h2_a09f3c656075_14788d8d241b",
        "openai-python" | "python-httpx" => "t13d1812h1_85036bcba153_b26ce05bbdd6",
        "node-undici" => "t13d1712h1_5b57614c22b0_5c2c66f702b0",
        "go-http" => "t13d1311h2_e8f1e7e78f70_b26ce05bbdd6",
        "curl" => "t13d3112h2_e8f1e7e78f70_375d5b2e6d7c",
        other => {
            return FingerprintId {
                ja4: Some(Arc::from(format!("x13d0000h2_{other}"))),
                syn_key: fnv(other),
            };
        }
    };
    // Python SDKs share one TLS stack (and so one JA4) but the profile names stay distinct clusters here only
    // when their JA4 differ.
    FingerprintId {
        ja4: Some(Arc::from(ja4)),
        syn_key: fnv(ja4) & 0xffff_ffff,
    }
}

fn fnv(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// How long the naive baseline blocks an address once its bucket overflows (CrowdSec's default ban).
pub const NAIVE_BLOCK_S: f64 = 4.0 * 3600.0;
/// Requests answered later than this after their population's start count as leakage "after the first minute".
pub const LATE_S: f64 = 60.0;
/// A request delayed longer than this counts as a failure the client notices (`adapt.notice_after`).
const NOTICE_DELAY_S: f64 = 1.0;
/// Client packets a new connection costs the throttle rate class (SYN, ACK, ClientHello).
const CONN_PACKETS: f64 = 3.0;

/// Whether decisions act on the simulated traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loop {
    /// Decisions are recorded only; the naive bucket watches the same stream.
    Open,
    /// Decisions are enforced (blocked requests fail, throttled ones meet the scenario's rate class) and
    /// populations adapt; the naive baseline runs its own closed-loop pass.
    Closed,
}

/// One simulated client (a person, a process, a campaign worker). Several may share an address.
struct Actor {
    pop: usize,
    /// Index into the address records.
    addr: u32,
    fp: FpKey,
    syn_key: u64,
    fp_epoch: u64,
    rotations: u32,
    burst_left: u32,
    /// Requests sent on each of the actor's parallel connections (0 = closed).
    flows: Vec<(u64, u32)>,
    next_flow: usize,
    fails: u32,
    rate_mult: f64,
    paused_until: f64,
}

/// One source address as the detector sees it.
struct AddrRec {
    pop: usize,
    ip: IpAddr,
    first_req_s: Option<f64>,
    monitor_s: Option<f64>,
    hit_s: Option<f64>,
    block_s: Option<f64>,
    /// The passive naive bucket (open loop).
    bucket: f64,
    bucket_t: f64,
    naive_s: Option<f64>,
    /// The throttle rate class's GCRA state (theoretical arrival times, s).
    pkt_tat: f64,
    conn_tat: f64,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    /// The actor's own timing process fires (and reschedules itself).
    Next(u32),
    /// One request of an actor, scheduled by a population-level process.
    Once(u32),
    /// A population-level round (lockstep) or synchronized burst trigger.
    Round(u32),
    /// A request the throttle delayed reaches the service (actor, bytes, opens a connection).
    Deliver(u32, u32),
}

/// Per-population outcome.
#[derive(Clone, Debug, Serialize)]
pub struct PopulationResult {
    pub name: String,
    /// The evaluation family (the population's `eval_family`, or its name).
    pub family: String,
    pub label: String,
    /// Clients in the population (the scenario's `sources`).
    pub sources: u32,
    /// Addresses that sent at least one request in aqd's run (the denominator of aqd's shares).
    pub active: u32,
    /// Requests attempted in aqd's run.
    pub requests: u64,
    pub aqd: Outcome,
    pub naive: Outcome,
    /// Addresses at least monitored by aqd.
    pub aqd_monitored: u32,
}

/// One detector's outcome for one population. "Sources" are addresses: a client that rotates to a fresh address
/// is a new source to the detector.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Outcome {
    /// Addresses that sent at least one request.
    pub active: u32,
    /// Addresses throttled or blocked at some point (for benign populations: false positives).
    pub hit: u32,
    pub blocked: u32,
    /// Hit within [`FAST_S`] seconds of the population start.
    pub hit_fast: u32,
    /// Hit within [`FAST_S`] seconds of the address's own first request.
    pub hit_fast_own: u32,
    /// Median / worst time from population start to the first decision over the hit addresses (s).
    pub t_median_s: Option<f64>,
    pub t_max_s: Option<f64>,
    /// Median / 90th percentile / worst time from an address's own first request to its first decision (s).
    pub own_median_s: Option<f64>,
    pub own_p90_s: Option<f64>,
    pub own_max_s: Option<f64>,
    /// Requests the clients tried to send, and what became of them (closed loop; open loop answers all).
    pub attempted: u64,
    /// Attempted more than [`LATE_S`] after the population start.
    pub attempted_late: u64,
    pub answered: u64,
    /// Answered more than [`LATE_S`] after the population start.
    pub answered_late: u64,
    /// Not answered: blocked, or over the rate class (refused, or delayed beyond its `max_delay`).
    pub refused: u64,
    /// Answered, but held back by the rate class.
    pub delayed: u64,
    /// Per hit address, seconds from its own first request / from the population start to its first decision
    /// (for aggregating families).
    #[serde(skip)]
    pub own_times: Vec<f64>,
    #[serde(skip)]
    pub pop_times: Vec<f64>,
}

impl Outcome {
    /// Adds another population's outcome (same detector) into this one.
    pub fn merge(&mut self, o: &Outcome) {
        self.active += o.active;
        self.hit += o.hit;
        self.blocked += o.blocked;
        self.hit_fast += o.hit_fast;
        self.hit_fast_own += o.hit_fast_own;
        self.attempted += o.attempted;
        self.attempted_late += o.attempted_late;
        self.answered += o.answered;
        self.answered_late += o.answered_late;
        self.refused += o.refused;
        self.delayed += o.delayed;
        self.own_times.extend_from_slice(&o.own_times);
        self.pop_times.extend_from_slice(&o.pop_times);
        self.finish();
    }

    /// Recomputes the quantiles from the kept times.
    fn finish(&mut self) {
        self.own_times.sort_by(f64::total_cmp);
        self.pop_times.sort_by(f64::total_cmp);
        let q =
            |v: &[f64], f: f64| (!v.is_empty()).then(|| v[((v.len() as f64 * f) as usize).min(v.len() - 1)]);
        self.t_median_s = q(&self.pop_times, 0.5);
        self.t_max_s = self.pop_times.last().copied();
        self.own_median_s = q(&self.own_times, 0.5);
        self.own_p90_s = q(&self.own_times, 0.9);
        self.own_max_s = self.own_times.last().copied();
    }
}

/// One scenario's outcome.
#[derive(Clone, Debug, Serialize)]
pub struct ScenarioResult {
    pub scenario: String,
    pub description: String,
    pub duration_s: f64,
    pub closed_loop: bool,
    pub observations: u64,
    pub decisions: usize,
    pub wall_ms: u128,
    pub populations: Vec<PopulationResult>,
    pub memory_bytes: usize,
}

/// Training hook: called every `every_s` simulated seconds with the model, the time and the ground truth.
pub struct Probe<'a> {
    pub every_s: f64,
    pub f: &'a mut dyn FnMut(&Model, u64, &Truth),
}

/// Ground truth the training hook needs: the label of every source address, fingerprint and prefix.
pub struct Truth {
    pub source: HashMap<IpAddr, Label>,
    /// Share of campaign sources among a fingerprint's / a prefix's sources.
    pub fingerprint: HashMap<u64, f64>,
    pub prefix: HashMap<IpNet, f64>,
}

/// The `host`-th address of an IPv4 /24 number `prefix_no`, or of IPv6 /64 number `prefix_no` inside the /48
/// number `net48` (each population has its own /48).
fn addr_for(family: scenario::Family, net48: u32, prefix_no: u32, host: u32) -> IpAddr {
    match family {
        scenario::Family::V4 => {
            let p = prefix_no;
            IpAddr::V4(Ipv4Addr::new(
                10 + (p >> 16) as u8,
                (p >> 8) as u8,
                p as u8,
                1 + (host % 254) as u8,
            ))
        }
        scenario::Family::V6 => IpAddr::V6(Ipv6Addr::new(
            0x2001,
            0x0db8,
            net48 as u16,
            prefix_no as u16,
            0,
            0,
            (host >> 16) as u16,
            1 + host as u16,
        )),
    }
}

/// The detector in the loop.
enum Detector {
    Aqd(Box<Model>),
    /// Per-address leaky bucket (capacity 40, one leak per 0.5 s) over the requests it sees; overflow blocks the
    /// address for [`NAIVE_BLOCK_S`].
    Naive {
        buckets: HashMap<IpAddr, (f64, f64)>,
        pending: Vec<super::ProposedDecision>,
        observations: u64,
    },
    /// Tests: the given decisions at the given simulated seconds, whatever the traffic.
    #[cfg(test)]
    Script {
        decisions: Vec<(f64, super::ProposedDecision)>,
        observations: u64,
    },
}

impl Detector {
    fn intern(&mut self, id: FingerprintId) -> FpKey {
        match self {
            Detector::Aqd(m) => m.intern(id),
            Detector::Naive { .. } => id.key(),
            #[cfg(test)]
            Detector::Script { .. } => id.key(),
        }
    }

    fn observe(&mut self, obs: &Observation) {
        match self {
            Detector::Aqd(m) => m.observe(obs),
            Detector::Naive {
                buckets,
                pending,
                observations,
            } => {
                *observations += 1;
                if let Observation::Request { time_ns, src, .. } = *obs {
                    let t = time_ns as f64 * 1e-9;
                    let b = buckets.entry(src).or_insert((0.0, t));
                    b.0 = (b.0 - (t - b.1) / 0.5).max(0.0) + 1.0;
                    b.1 = t;
                    if b.0 > 40.0 {
                        b.0 = 0.0;
                        pending.push(super::ProposedDecision {
                            scope: Scope::Source(src),
                            action: Action::Block,
                            ttl: std::time::Duration::from_secs_f64(NAIVE_BLOCK_S),
                            score: 1.0,
                            reason: "naive per-IP bucket overflow".into(),
                            refresh: false,
                        });
                    }
                }
            }
            #[cfg(test)]
            Detector::Script { observations, .. } => *observations += 1,
        }
    }

    fn tick(&mut self, now_ns: u64) -> Vec<super::ProposedDecision> {
        match self {
            Detector::Aqd(m) => m.tick(now_ns, &()),
            Detector::Naive { pending, .. } => std::mem::take(pending),
            #[cfg(test)]
            Detector::Script { decisions, .. } => {
                let t = (now_ns - MONO0_NS) as f64 * 1e-9;
                let (due, later) = std::mem::take(decisions)
                    .into_iter()
                    .partition(|(at, _)| *at <= t);
                *decisions = later;
                due.into_iter().map(|(_, d)| d).collect::<Vec<_>>()
            }
        }
    }

    fn observations(&self) -> u64 {
        match self {
            Detector::Aqd(m) => m.stats().observations,
            Detector::Naive { observations, .. } => *observations,
            #[cfg(test)]
            Detector::Script { observations, .. } => *observations,
        }
    }

    fn memory_bytes(&self) -> usize {
        match self {
            Detector::Aqd(m) => m.memory_report().total_bytes,
            Detector::Naive { buckets, .. } => buckets.len() * 48,
            #[cfg(test)]
            Detector::Script { .. } => 0,
        }
    }
}

/// Decisions in force, by scope: (action, until s).
#[derive(Default)]
struct InForce {
    src: HashMap<IpAddr, (Action, f64)>,
    prefix: HashMap<IpNet, (Action, f64)>,
    fp: HashMap<FpKey, (Action, f64)>,
}

impl InForce {
    /// The strongest throttle or block covering a request from `ip` with `fp` at `t`.
    fn action(&self, ip: IpAddr, fp: FpKey, t: f64) -> Option<Action> {
        let live =
            |e: Option<&(Action, f64)>| e.filter(|(a, u)| *a >= Action::Throttle && *u > t).map(|e| e.0);
        [
            live(self.src.get(&ip)),
            live(self.prefix.get(&prefix_of(ip))),
            live(self.fp.get(&fp)),
        ]
        .into_iter()
        .flatten()
        .max()
    }
}

/// What one pass of the simulation produced.
struct Pass {
    outcomes: Vec<Outcome>,
    naive_passive: Vec<Outcome>,
    monitored: Vec<u32>,
    observations: u64,
    decisions: usize,
    memory_bytes: usize,
}

/// Runs one scenario open loop (decisions recorded, not enforced; the naive bucket watches the same stream), with
/// an optional training probe.
pub fn run(sc: &Scenario, weights: &WeightsFile, probe: Option<Probe<'_>>) -> ScenarioResult {
    run_with(sc, weights, Loop::Open, probe)
}

/// Runs one scenario closed loop: aqd's pass with its decisions enforced, then the naive baseline's own pass.
pub fn run_closed(sc: &Scenario, weights: &WeightsFile) -> ScenarioResult {
    run_with(sc, weights, Loop::Closed, None)
}

/// Runs one scenario.
pub fn run_with(
    sc: &Scenario,
    weights: &WeightsFile,
    mode: Loop,
    probe: Option<Probe<'_>>,
) -> ScenarioResult {
    let started = std::time::Instant::now();
    let start_unix_ns = (DAY0_UNIX_S as i128 * 1_000_000_000 + (sc.start_hour * 3600e9) as i128) as i64;
    let cfg = ModelConfig {
        wall_offset_ns: start_unix_ns - MONO0_NS as i64,
        release_unix_s: sc.release_at.map(|r| (start_unix_ns as f64 / 1e9 + r.0) as i64),
        max_sources: 200_000,
        ..ModelConfig::default()
    };
    let model = Model::with_weights(cfg, weights.clone()).expect("weights compile");
    let closed = mode == Loop::Closed;
    let aqd = simulate(sc, Detector::Aqd(Box::new(model)), closed, probe);
    let naive = closed.then(|| {
        simulate(
            sc,
            Detector::Naive {
                buckets: HashMap::new(),
                pending: Vec::new(),
                observations: 0,
            },
            true,
            None,
        )
    });
    let pops = sc
        .populations
        .iter()
        .enumerate()
        .map(|(pi, p)| PopulationResult {
            name: p.name.clone(),
            family: p.eval_family.clone().unwrap_or_else(|| p.name.clone()),
            label: match p.label {
                Label::Benign => "benign".into(),
                Label::Campaign => "campaign".into(),
            },
            sources: p.sources,
            active: aqd.outcomes[pi].active,
            requests: aqd.outcomes[pi].attempted,
            aqd: aqd.outcomes[pi].clone(),
            naive: naive
                .as_ref()
                .map_or_else(|| aqd.naive_passive[pi].clone(), |n| n.outcomes[pi].clone()),
            aqd_monitored: aqd.monitored[pi],
        })
        .collect();
    ScenarioResult {
        scenario: sc.name.clone(),
        description: sc.description.clone(),
        duration_s: sc.duration.0,
        closed_loop: closed,
        observations: aqd.observations,
        decisions: aqd.decisions,
        wall_ms: started.elapsed().as_millis(),
        populations: pops,
        memory_bytes: aqd.memory_bytes,
    }
}

/// Where a population's fresh (rotation) addresses come from.
struct Pool {
    net48: u32,
    base_prefix: u32,
    prefixes: u32,
    used: u32,
    size: u32,
}

/// The simulation state one pass works on.
struct World<'s> {
    sc: &'s Scenario,
    det: Detector,
    enforce: bool,
    actors: Vec<Actor>,
    addrs: Vec<AddrRec>,
    by_ip: HashMap<IpAddr, u32>,
    /// Addresses per prefix (append-only: addresses never change prefix).
    by_prefix: HashMap<IpNet, Vec<u32>>,
    /// Actors that ever presented a fingerprint (append-only; checked against the actor's current one).
    by_fp: HashMap<FpKey, Vec<u32>>,
    in_force: InForce,
    pools: Vec<Pool>,
    /// Fresh shared fingerprints per (population, epoch).
    epoch_fp: HashMap<(usize, u64), FpKey>,
    truth: Truth,
    out: Vec<Outcome>,
    flow_seq: u64,
    decisions: usize,
    rng: Rng,
}

fn simulate(sc: &Scenario, det: Detector, enforce: bool, probe: Option<Probe<'_>>) -> Pass {
    let mut w = World {
        sc,
        det,
        enforce,
        actors: Vec::new(),
        addrs: Vec::new(),
        by_ip: HashMap::new(),
        by_prefix: HashMap::new(),
        by_fp: HashMap::new(),
        in_force: InForce::default(),
        pools: Vec::new(),
        epoch_fp: HashMap::new(),
        truth: Truth {
            source: HashMap::new(),
            fingerprint: HashMap::new(),
            prefix: HashMap::new(),
        },
        out: vec![Outcome::default(); sc.populations.len()],
        flow_seq: 0,
        decisions: 0,
        rng: Rng::new(sc.seed),
    };
    w.populate();
    let mut pop_members: Vec<Vec<u32>> = vec![Vec::new(); sc.populations.len()];
    for (i, a) in w.actors.iter().enumerate() {
        pop_members[a.pop].push(i as u32);
    }

    // Initial events.
    let mut heap: BinaryHeap<Reverse<(u64, Ev)>> = BinaryHeap::new();
    for (pi, p) in sc.populations.iter().enumerate() {
        let (start, _) = sc.window(p);
        match p.timing {
            Timing::Lockstep { .. } => heap.push(Reverse((to_ns(start), Ev::Round(pi as u32)))),
            Timing::Bursty {
                synchronized: true,
                burst,
                ..
            } => heap.push(Reverse((
                to_ns(start + w.rng.exp(burst as f64 / p.rate).min(5.0)),
                Ev::Round(pi as u32),
            ))),
            _ => {}
        }
    }
    for i in 0..w.actors.len() {
        let p = &sc.populations[w.actors[i].pop];
        let (start, _) = sc.window(p);
        let rng = &mut w.rng;
        let first = match p.timing {
            Timing::Lockstep { .. }
            | Timing::Bursty {
                synchronized: true, ..
            } => continue,
            Timing::Periodic { .. } => start + rng.f64() / p.rate,
            Timing::Human { think, .. } => start + rng.f64() * think.0,
            Timing::Bursty { .. } => start + rng.exp(1.0 / p.rate).min(30.0),
            _ => start + rng.exp(1.0 / p.rate),
        };
        heap.push(Reverse((to_ns(first), Ev::Next(i as u32))));
    }

    let mut next_tick = 1.0f64;
    let mut next_probe = probe.as_ref().map_or(f64::INFINITY, |p| p.every_s);
    let mut probe = probe;
    let end = sc.duration.0;

    loop {
        let next_ev = heap
            .peek()
            .map_or(f64::INFINITY, |Reverse((t, _))| *t as f64 * 1e-9);
        // Ticks and probes due before the next event.
        while next_tick <= next_ev.min(end) || next_probe <= next_ev.min(end) {
            if next_probe < next_tick {
                let pr = probe.as_mut().expect("a probe is set");
                if let Detector::Aqd(m) = &w.det {
                    (pr.f)(m, MONO0_NS + to_ns(next_probe), &w.truth);
                }
                next_probe += pr.every_s;
            } else {
                let ds = w.det.tick(MONO0_NS + to_ns(next_tick));
                w.apply(ds, next_tick);
                next_tick += 1.0;
            }
        }
        if next_ev >= end {
            break;
        }
        let Reverse((t_ns, ev)) = heap.pop().expect("peeked");
        let t = t_ns as f64 * 1e-9;
        match ev {
            Ev::Round(pi) => {
                let p = &sc.populations[pi as usize];
                let (_, pend) = sc.window(p);
                match p.timing {
                    Timing::Lockstep {
                        jitter,
                        participation,
                    } => {
                        for &i in &pop_members[pi as usize] {
                            let m = w.actors[i as usize].rate_mult;
                            if w.rng.f64() < participation * m {
                                heap.push(Reverse((t_ns + to_ns(w.rng.f64() * jitter.0), Ev::Once(i))));
                            }
                        }
                        let next = t + (1.0 / p.rate) * (0.9 + 0.2 * w.rng.f64());
                        if next < pend {
                            heap.push(Reverse((to_ns(next), Ev::Round(pi))));
                        }
                    }
                    Timing::Bursty { burst, spread, .. } => {
                        for &i in &pop_members[pi as usize] {
                            let m = w.actors[i as usize].rate_mult;
                            if m < 1.0 && w.rng.f64() >= m {
                                continue;
                            }
                            w.actors[i as usize].burst_left = burst;
                            heap.push(Reverse((t_ns + to_ns(w.rng.f64() * spread.0), Ev::Next(i))));
                        }
                        let next = t + w.rng.exp(burst as f64 / p.rate);
                        if next < pend {
                            heap.push(Reverse((to_ns(next), Ev::Round(pi))));
                        }
                    }
                    _ => {}
                }
            }
            Ev::Deliver(i, bytes) => {
                let ai = i as usize;
                let p = &sc.populations[w.actors[ai].pop];
                w.emit_request(ai, p, t_ns, bytes);
            }
            Ev::Next(i) | Ev::Once(i) => {
                let ai = i as usize;
                let p = &sc.populations[w.actors[ai].pop];
                let (_, pend) = sc.window(p);
                if t >= pend {
                    continue;
                }
                if let Some(d) = w.request(ai, p, t, t_ns) {
                    heap.push(Reverse((t_ns + to_ns(d.0), Ev::Deliver(i, d.1))));
                }
                if let Ev::Next(_) = ev
                    && let Some(g) = w.gap(ai, p, t, pend)
                {
                    let next = t + g / w.actors[ai].rate_mult;
                    if next < pend {
                        heap.push(Reverse((to_ns(next), Ev::Next(i))));
                    }
                }
            }
        }
    }

    // Results.
    let mut monitored = vec![0u32; sc.populations.len()];
    let mut passive = vec![Outcome::default(); sc.populations.len()];
    for a in &w.addrs {
        let Some(first) = a.first_req_s else { continue };
        let (start, _) = sc.window(&sc.populations[a.pop]);
        let o = &mut w.out[a.pop];
        o.active += 1;
        if a.monitor_s.is_some() || a.hit_s.is_some() {
            monitored[a.pop] += 1;
        }
        let record = |o: &mut Outcome, hit: Option<f64>, blocked: bool| {
            if let Some(h) = hit {
                let h = h.max(first);
                o.hit += 1;
                o.blocked += blocked as u32;
                o.own_times.push(h - first);
                o.pop_times.push(h - start);
                o.hit_fast += (h - start <= FAST_S) as u32;
                o.hit_fast_own += (h - first <= FAST_S) as u32;
            }
        };
        record(o, a.hit_s, a.block_s.is_some());
        let n = &mut passive[a.pop];
        n.active += 1;
        record(n, a.naive_s, a.naive_s.is_some());
    }
    for (o, n) in w.out.iter_mut().zip(passive.iter_mut()) {
        o.finish();
        n.attempted = o.attempted;
        n.attempted_late = o.attempted_late;
        n.answered = o.attempted;
        n.answered_late = o.attempted_late;
        n.finish();
    }
    Pass {
        outcomes: w.out,
        naive_passive: passive,
        monitored,
        observations: w.det.observations(),
        decisions: w.decisions,
        memory_bytes: w.det.memory_bytes(),
    }
}

fn to_ns(s: f64) -> u64 {
    (s.max(0.0) * 1e9) as u64
}

impl World<'_> {
    /// Creates every population's actors and addresses, and the rotation pools.
    fn populate(&mut self) {
        let sc = self.sc;
        let mut prefix_no = 0u32;
        let mut pop_fp: HashMap<&str, FpKey> = HashMap::new();
        for (pi, p) in sc.populations.iter().enumerate() {
            let n_addr = p.addresses.unwrap_or(p.sources);
            let np = p.prefixes.unwrap_or(n_addr);
            let net48 = 0x100 + pi as u32;
            let first = self.addrs.len() as u32;
            for k in 0..n_addr {
                let (px, host) = match p.family {
                    scenario::Family::V4 => (prefix_no + k % np, k / np),
                    scenario::Family::V6 => (k % np, k / np),
                };
                self.new_addr(pi, addr_for(p.family, net48, px, host));
            }
            let shared = (p.fingerprint != "unique").then(|| {
                *pop_fp
                    .entry(p.fingerprint.as_str())
                    .or_insert_with(|| self.det.intern(profile(&p.fingerprint)))
            });
            for i in 0..p.sources {
                let (fp, syn_key) = match shared {
                    Some(fp) => (fp, profile(&p.fingerprint).syn_key),
                    None => {
                        let syn_key = match &p.syn {
                            Some(name) => profile(name).syn_key,
                            None => self.rng.next_u64(),
                        };
                        let id = FingerprintId {
                            ja4: Some(Arc::from(format!("u13d0000h2_{}_{i}", p.name))),
                            syn_key,
                        };
                        (self.det.intern(id), syn_key)
                    }
                };
                let idx = self.actors.len() as u32;
                self.by_fp.entry(fp).or_default().push(idx);
                self.actors.push(Actor {
                    pop: pi,
                    addr: first + i % n_addr,
                    fp,
                    syn_key,
                    fp_epoch: 0,
                    rotations: 0,
                    burst_left: 0,
                    flows: vec![(0, 0); p.concurrency as usize],
                    next_flow: 0,
                    fails: 0,
                    rate_mult: 1.0,
                    paused_until: 0.0,
                });
            }
            if p.family == scenario::Family::V4 {
                prefix_no += np;
            }
        }
        for (pi, p) in sc.populations.iter().enumerate() {
            let (size, pp) = p
                .adapt
                .as_ref()
                .map_or((0, 1), |a| (a.pool, a.pool_prefixes.unwrap_or(a.pool).max(1)));
            let own = p.prefixes.unwrap_or(p.addresses.unwrap_or(p.sources));
            self.pools.push(Pool {
                net48: 0x100 + pi as u32,
                base_prefix: match p.family {
                    scenario::Family::V4 => prefix_no,
                    scenario::Family::V6 => own,
                },
                prefixes: pp,
                used: 0,
                size,
            });
            if p.family == scenario::Family::V4 {
                prefix_no += pp;
            }
        }
        // Ground truth for training (the initial addresses; pool addresses are added when used).
        let label = |pop: usize| sc.populations[pop].label;
        let share = |ls: &mut dyn Iterator<Item = Label>| {
            let (mut c, mut n) = (0usize, 0usize);
            for l in ls {
                n += 1;
                c += (l == Label::Campaign) as usize;
            }
            c as f64 / n.max(1) as f64
        };
        for (k, ids) in &self.by_fp {
            let v = share(&mut ids.iter().map(|&i| label(self.actors[i as usize].pop)));
            self.truth.fingerprint.insert(k.0, v);
        }
        for (k, ids) in &self.by_prefix {
            let v = share(&mut ids.iter().map(|&i| label(self.addrs[i as usize].pop)));
            self.truth.prefix.insert(*k, v);
        }
    }

    fn new_addr(&mut self, pop: usize, ip: IpAddr) -> u32 {
        let idx = self.addrs.len() as u32;
        self.by_ip.insert(ip, idx);
        self.by_prefix.entry(prefix_of(ip)).or_default().push(idx);
        self.truth.source.insert(ip, self.sc.populations[pop].label);
        self.addrs.push(AddrRec {
            pop,
            ip,
            first_req_s: None,
            monitor_s: None,
            hit_s: None,
            block_s: None,
            bucket: 0.0,
            bucket_t: 0.0,
            naive_s: None,
            pkt_tat: 0.0,
            conn_tat: 0.0,
        });
        idx
    }

    /// Records decisions: the scopes in force, and the first decision time of every address they cover now.
    fn apply(&mut self, ds: Vec<super::ProposedDecision>, t: f64) {
        self.decisions += ds.len();
        for d in ds {
            let until = t + d.ttl.as_secs_f64();
            let addrs: Vec<u32> = match &d.scope {
                Scope::Source(a) => {
                    self.in_force.src.insert(*a, (d.action, until));
                    self.by_ip.get(a).map(|&i| vec![i]).unwrap_or_default()
                }
                Scope::Prefix(n) => {
                    self.in_force.prefix.insert(*n, (d.action, until));
                    self.by_prefix.get(n).cloned().unwrap_or_default()
                }
                Scope::Fingerprint(id) => {
                    let k = id.key();
                    self.in_force.fp.insert(k, (d.action, until));
                    self.by_fp
                        .get(&k)
                        .map(|v| {
                            v.iter()
                                .filter(|&&a| self.actors[a as usize].fp == k)
                                .map(|&a| self.actors[a as usize].addr)
                                .collect()
                        })
                        .unwrap_or_default()
                }
            };
            for i in addrs {
                let a = &mut self.addrs[i as usize];
                match d.action {
                    Action::Monitor => {
                        a.monitor_s.get_or_insert(t);
                    }
                    Action::Throttle => {
                        a.hit_s.get_or_insert(t);
                    }
                    Action::Block => {
                        a.hit_s.get_or_insert(t);
                        a.block_s.get_or_insert(t);
                    }
                }
            }
        }
    }

    /// One request attempt of actor `ai` at `t`. Returns (delay s, bytes) when the rate class delays it.
    fn request(&mut self, ai: usize, p: &Population, t: f64, t_ns: u64) -> Option<(f64, u32)> {
        let (start, _) = self.sc.window(p);
        if self.actors[ai].paused_until > t {
            return None;
        }
        if let Some(a) = &p.adapt {
            if let Some(every) = a.pause_every
                && (t - start).rem_euclid(every.0) >= every.0 - a.pause_for.0
            {
                return None;
            }
            if let Some(every) = a.fingerprint_every {
                let epoch = ((t - start).max(0.0) / every.0) as u64;
                if epoch != self.actors[ai].fp_epoch {
                    self.actors[ai].fp_epoch = epoch;
                    self.new_fingerprint(ai, p, Some(epoch));
                }
            }
        }
        let bytes = sample_size(&p.sizes, &mut self.rng);
        let pop = self.actors[ai].pop;
        self.out[pop].attempted += 1;
        let ip = self.addrs[self.actors[ai].addr as usize].ip;
        let rec = &mut self.addrs[self.actors[ai].addr as usize];
        rec.first_req_s.get_or_insert(t);
        // The passive naive baseline (open loop).
        rec.bucket = (rec.bucket - (t - rec.bucket_t) / 0.5).max(0.0) + 1.0;
        rec.bucket_t = t;
        if rec.bucket > 40.0 && rec.naive_s.is_none() {
            rec.naive_s = Some(t);
        }
        let action = self.in_force.action(ip, self.actors[ai].fp, t);
        match action {
            Some(Action::Block) => {
                rec.hit_s.get_or_insert(t);
                rec.block_s.get_or_insert(t);
            }
            Some(_) => {
                rec.hit_s.get_or_insert(t);
            }
            None => {}
        }
        let late = t - start > LATE_S;
        self.out[pop].attempted_late += late as u64;
        if !self.enforce || action.is_none() {
            self.answered(ai, pop, late);
            self.emit_request(ai, p, t_ns, bytes);
            return None;
        }
        if action == Some(Action::Block) {
            self.out[pop].refused += 1;
            self.failed(ai, p, Action::Block, t);
            return None;
        }
        // Throttled: the per-address GCRA of the rate class, for the request's packets and a new connection.
        let sc = self.sc;
        let rc = &sc.rate_class;
        let a = &self.actors[ai];
        let opens = a.flows[a.next_flow].1 == 0;
        let packets = (bytes / 1400 + 1) as f64 + if opens { CONN_PACKETS } else { 0.0 };
        let rec = &mut self.addrs[a.addr as usize];
        // A request passes once the limiter admits its first packet (GCRA: tat − τ ≤ now, τ = (burst − 1)·I);
        // all its packets are charged (so a request larger than the burst cannot wait forever).
        let earliest = |tat: f64, rate: f64, burst: f64| {
            if rate <= 0.0 {
                t
            } else {
                t.max(tat - (burst.max(1.0) - 1.0) / rate)
            }
        };
        let mut at = earliest(rec.pkt_tat, rc.packets_per_second, rc.packet_burst);
        if opens {
            at = at.max(earliest(
                rec.conn_tat,
                rc.connections_per_second,
                rc.connection_burst,
            ));
        }
        let delay = at - t;
        let refuse = match rc.over {
            scenario::Over::Refuse => delay > 0.0,
            scenario::Over::Delay => delay > rc.max_delay.0,
        };
        if refuse {
            self.out[pop].refused += 1;
            self.failed(ai, p, Action::Throttle, t);
            return None;
        }
        if rc.packets_per_second > 0.0 {
            rec.pkt_tat = rec.pkt_tat.max(at) + packets / rc.packets_per_second;
        }
        if opens && rc.connections_per_second > 0.0 {
            rec.conn_tat = rec.conn_tat.max(at) + 1.0 / rc.connections_per_second;
        }
        if delay <= 0.0 {
            self.answered(ai, pop, late);
            self.emit_request(ai, p, t_ns, bytes);
            return None;
        }
        self.out[pop].delayed += 1;
        self.out[pop].answered += 1;
        self.out[pop].answered_late += (at - start > LATE_S) as u64;
        if delay > NOTICE_DELAY_S {
            self.failed(ai, p, Action::Throttle, t);
        } else {
            self.actors[ai].fails = 0;
        }
        Some((delay, bytes))
    }

    fn answered(&mut self, ai: usize, pop: usize, late: bool) {
        self.out[pop].answered += 1;
        self.out[pop].answered_late += late as u64;
        self.actors[ai].fails = 0;
    }

    /// A failed request: after `notice_after` in a row the actor reacts as its population's `adapt` says.
    fn failed(&mut self, ai: usize, p: &Population, why: Action, t: f64) {
        let Some(ad) = &p.adapt else { return };
        let a = &mut self.actors[ai];
        a.fails += 1;
        if a.fails < ad.notice_after {
            return;
        }
        a.fails = 0;
        let reaction = if why == Action::Block {
            ad.on_block
        } else {
            ad.on_throttle
        };
        match reaction {
            Reaction::None => {}
            Reaction::Slow => a.rate_mult = (a.rate_mult * ad.slow_factor).max(1e-3),
            Reaction::Pause => a.paused_until = t + ad.pause_for.0,
            Reaction::Rotate => {
                let pool = &mut self.pools[a.pop];
                if pool.used >= pool.size {
                    // The pool is used up: the actor carries on from its address.
                    return;
                }
                let j = pool.used;
                pool.used += 1;
                let ip = addr_for(
                    p.family,
                    pool.net48,
                    pool.base_prefix + j % pool.prefixes,
                    j / pool.prefixes,
                );
                let pop = a.pop;
                let idx = self.new_addr(pop, ip);
                let a = &mut self.actors[ai];
                a.addr = idx;
                a.rotations += 1;
                a.flows.iter_mut().for_each(|f| *f = (0, 0));
                if ad.rotate_fingerprint {
                    self.new_fingerprint(ai, p, None);
                }
            }
        }
    }

    /// Gives actor `ai` a fresh JA4 (keeping its SYN signature): shared per epoch for a shared-fingerprint
    /// population, its own otherwise.
    fn new_fingerprint(&mut self, ai: usize, p: &Population, epoch: Option<u64>) {
        let a = &self.actors[ai];
        let (pop, syn_key, rot) = (a.pop, a.syn_key, a.rotations);
        let fp = match epoch {
            Some(e) if p.fingerprint != "unique" => {
                let name = format!("e13d{e:04}h2_{}_{}", p.fingerprint, p.name);
                let det = &mut self.det;
                *self.epoch_fp.entry((pop, e)).or_insert_with(|| {
                    det.intern(FingerprintId {
                        ja4: Some(Arc::from(name)),
                        syn_key,
                    })
                })
            }
            _ => self.det.intern(FingerprintId {
                ja4: Some(Arc::from(format!(
                    "r13d{:04}h2_{}_{ai}_{rot}",
                    epoch.unwrap_or(0),
                    p.name
                ))),
                syn_key,
            }),
        };
        let a = &mut self.actors[ai];
        a.fp = fp;
        a.flows.iter_mut().for_each(|f| *f = (0, 0));
        self.by_fp.entry(fp).or_default().push(ai as u32);
    }

    /// The gap to the actor's next request from its own timing process (None: it waits for a round).
    fn gap(&mut self, ai: usize, p: &Population, t: f64, pend: f64) -> Option<f64> {
        let rng = &mut self.rng;
        let sc = self.sc;
        match p.timing {
            Timing::Poisson => Some(rng.exp(1.0 / p.rate)),
            Timing::Periodic { jitter } => {
                Some((1.0 / p.rate) * (1.0 + jitter * (2.0 * rng.f64() - 1.0)).max(0.01))
            }
            Timing::Diurnal { peak_hour, trough } => {
                // Thinning: candidate gaps at the peak rate, kept with the hour's relative rate.
                let mut tt = t;
                loop {
                    tt += rng.exp(1.0 / p.rate);
                    let h = (sc.start_hour + tt / 3600.0) % 24.0;
                    let m = trough
                        + (1.0 - trough)
                            * (0.5 + 0.5 * (std::f64::consts::TAU * (h - peak_hour) / 24.0).cos());
                    if rng.f64() < m || tt > pend {
                        break;
                    }
                }
                Some(tt - t)
            }
            Timing::Human { think, session, idle } => {
                let s = &mut self.actors[ai];
                if s.burst_left == 0 {
                    s.burst_left = 1 + rng.below(2 * session as u64) as u32;
                }
                s.burst_left -= 1;
                if s.burst_left == 0 {
                    Some(rng.exp(idle.0))
                } else {
                    Some(think.0 * (rng.normal() * 0.8).exp())
                }
            }
            Timing::Bursty {
                burst,
                gap,
                synchronized,
                ..
            } => {
                let s = &mut self.actors[ai];
                if s.burst_left == 0 && !synchronized {
                    s.burst_left = burst;
                }
                s.burst_left = s.burst_left.saturating_sub(1);
                if s.burst_left > 0 {
                    Some(gap.0 * (0.5 + rng.f64()))
                } else if synchronized {
                    None
                } else {
                    Some(rng.exp(burst as f64 / p.rate))
                }
            }
            Timing::Lockstep { .. } => None,
        }
    }

    /// Feeds one answered request (and the connection it opens or closes) to the detector.
    fn emit_request(&mut self, ai: usize, p: &Population, t_ns: u64, bytes: u32) {
        let now = MONO0_NS + t_ns;
        let a = &mut self.actors[ai];
        let src = self.addrs[a.addr as usize].ip;
        let fp = a.fp;
        let fi = a.next_flow;
        a.next_flow = (a.next_flow + 1) % a.flows.len();
        if a.flows[fi].1 == 0 {
            self.flow_seq += 1;
            a.flows[fi].0 = self.flow_seq;
            self.det.observe(&Observation::ConnOpen {
                time_ns: now,
                src,
                flow: self.flow_seq,
                fp,
            });
        }
        let flow = a.flows[fi].0;
        let packets = (bytes / 1400 + 1).min(u16::MAX as u32) as u16;
        self.det.observe(&Observation::Request {
            time_ns: now,
            src,
            flow,
            fp,
            bytes,
            packets,
        });
        a.flows[fi].1 += 1;
        if a.flows[fi].1 >= p.requests_per_conn {
            let n = a.flows[fi].1;
            a.flows[fi].1 = 0;
            let server = (self.rng.f64() * 20_000.0) as u64 * n as u64;
            self.det.observe(&Observation::ConnClose {
                time_ns: now + 1_000_000,
                src,
                flow,
                fp,
                requests: n,
                client_bytes: 0,
                server_bytes_est: server,
            });
        }
    }
}

fn sample_size(sizes: &Sizes, rng: &mut Rng) -> u32 {
    let v = match sizes {
        Sizes::Templated { values, jitter } => {
            let base = values[rng.below(values.len() as u64) as usize] as f64;
            base * (1.0 + jitter * (2.0 * rng.f64() - 1.0))
        }
        Sizes::LogNormal { median, sigma } => median * (sigma * rng.normal()).exp(),
        Sizes::Uniform { min, max } => *min as f64 + rng.f64() * (max.saturating_sub(*min)) as f64,
    };
    v.clamp(40.0, 4e6) as u32
}

fn pct(n: u64, d: u64) -> String {
    if d == 0 {
        "-".into()
    } else {
        format!("{:.1}%", 100.0 * n as f64 / d as f64)
    }
}

fn pct_u(n: u32, d: u32) -> String {
    pct(n as u64, d as u64)
}

fn secs(v: Option<f64>) -> String {
    v.map_or("-".into(), |t| format!("{t:.1}"))
}

/// One row: a population, or a family's populations merged.
struct Row {
    group: String,
    name: String,
    count: u32,
    label: String,
    aqd: Outcome,
    naive: Outcome,
}

fn campaign_cells(o: &Outcome) -> String {
    format!(
        "{:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>9} {:>6} {:>6}",
        o.active,
        pct_u(o.hit, o.active),
        pct_u(o.hit_fast_own, o.active),
        secs(o.own_median_s),
        secs(o.own_p90_s),
        secs(o.t_median_s),
        o.answered,
        pct(o.answered, o.attempted),
        pct(o.answered_late, o.attempted_late),
    )
}

fn benign_cells(o: &Outcome) -> String {
    format!(
        "{:>6} {:>6} {:>6} {:>9} {:>6} {:>6}",
        o.active,
        pct_u(o.hit, o.active),
        pct_u(o.blocked, o.active),
        o.attempted,
        pct(o.refused, o.attempted),
        pct(o.delayed, o.attempted),
    )
}

fn render_rows(rows: &[Row], first: &str) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let w1 = rows
        .iter()
        .map(|r| r.group.chars().count())
        .max()
        .unwrap_or(8)
        .clamp(8, 26);
    let camp: Vec<&Row> = rows.iter().filter(|r| r.label == "campaign").collect();
    let ben: Vec<&Row> = rows.iter().filter(|r| r.label != "campaign").collect();
    let c_head = format!(
        "{:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>9} {:>6} {:>6}",
        "addrs", "hit", "≤10s", "t50", "t90", "t50pop", "answered", "ans%", ">60s%"
    );
    let b_head = format!(
        "{:>6} {:>6} {:>6} {:>9} {:>6} {:>6}",
        "addrs", "thr+bl", "block", "requests", "refus", "delay"
    );
    if !camp.is_empty() {
        let _ = writeln!(
            o,
            "CAMPAIGN — hit: addresses throttled or blocked; ≤10s, t50, t90: from the address's own first request \
             (s); t50pop: from the population start; answered: requests answered (ans%: of attempted; >60s%: of \
             those attempted after the first 60 s)"
        );
        let _ = writeln!(
            o,
            "{:<w1$} {:<22} | aqd {c_head} | naive {c_head}",
            first, "population"
        );
        for r in &camp {
            let _ = writeln!(
                o,
                "{:<w1$} {:<22} |     {} |       {}",
                trunc(&r.group, w1),
                trunc(&r.name, 22),
                campaign_cells(&r.aqd),
                campaign_cells(&r.naive)
            );
        }
        let _ = writeln!(o);
    }
    if !ben.is_empty() {
        let _ = writeln!(
            o,
            "HONEST — thr+bl: addresses ever throttled or blocked; block: blocked; refus / delay: requests not \
             answered / answered late"
        );
        let _ = writeln!(
            o,
            "{:<w1$} {:<22} | aqd {b_head} | naive {b_head}",
            first, "population"
        );
        for r in &ben {
            let _ = writeln!(
                o,
                "{:<w1$} {:<22} |     {} |       {}",
                trunc(&r.group, w1),
                trunc(&r.name, 22),
                benign_cells(&r.aqd),
                benign_cells(&r.naive)
            );
        }
        let _ = writeln!(o);
    }
    o
}

fn totals(results: &[ScenarioResult]) -> String {
    use std::fmt::Write;
    let (mut ca, mut cn, mut ba, mut bn) = (
        Outcome::default(),
        Outcome::default(),
        Outcome::default(),
        Outcome::default(),
    );
    for r in results {
        for p in &r.populations {
            if p.label == "campaign" {
                ca.merge(&p.aqd);
                cn.merge(&p.naive);
            } else {
                ba.merge(&p.aqd);
                bn.merge(&p.naive);
            }
        }
    }
    let mut o = String::new();
    let loop_ = if results.iter().all(|r| r.closed_loop) {
        "closed loop"
    } else {
        "open loop"
    };
    let _ = writeln!(
        o,
        "TOTALS over {} scenarios ({loop_}), aqd vs naive:",
        results.len()
    );
    let _ = writeln!(
        o,
        "  campaign addresses throttled/blocked within {FAST_S:.0} s of their own first request: aqd {} of {} ({}), \
         naive {} of {} ({}) [target ≥ 99%]",
        ca.hit_fast_own,
        ca.active,
        pct_u(ca.hit_fast_own, ca.active),
        cn.hit_fast_own,
        cn.active,
        pct_u(cn.hit_fast_own, cn.active)
    );
    let _ = writeln!(
        o,
        "  campaign addresses ever throttled/blocked: aqd {}, naive {}; time from own first request t50/t90: aqd \
         {}/{} s, naive {}/{} s",
        pct_u(ca.hit, ca.active),
        pct_u(cn.hit, cn.active),
        secs(ca.own_median_s),
        secs(ca.own_p90_s),
        secs(cn.own_median_s),
        secs(cn.own_p90_s)
    );
    let _ = writeln!(
        o,
        "  campaign requests answered: aqd {} of {} attempted ({}), naive {} of {} ({})",
        ca.answered,
        ca.attempted,
        pct(ca.answered, ca.attempted),
        cn.answered,
        cn.attempted,
        pct(cn.answered, cn.attempted)
    );
    let _ = writeln!(
        o,
        "  campaign requests answered after the first {LATE_S:.0} s: aqd {} of {} ({}), naive {} of {} ({}) [target ≤ 1%]",
        ca.answered_late,
        ca.attempted_late,
        pct(ca.answered_late, ca.attempted_late),
        cn.answered_late,
        cn.attempted_late,
        pct(cn.answered_late, cn.attempted_late)
    );
    let _ = writeln!(
        o,
        "  honest addresses: aqd {} of {} throttled or blocked ({}), {} blocked; naive {} of {} ({}), {} blocked \
         [target ≤ 0.1%, 0 blocked]",
        ba.hit,
        ba.active,
        pct_u(ba.hit, ba.active),
        ba.blocked,
        bn.hit,
        bn.active,
        pct_u(bn.hit, bn.active),
        bn.blocked
    );
    let _ = writeln!(
        o,
        "  honest requests: aqd {} refused, {} delayed of {} ({} / {}); naive {} refused, {} delayed of {} ({} / {})",
        ba.refused,
        ba.delayed,
        ba.attempted,
        pct(ba.refused, ba.attempted),
        pct(ba.delayed, ba.attempted),
        bn.refused,
        bn.delayed,
        bn.attempted,
        pct(bn.refused, bn.attempted),
        pct(bn.delayed, bn.attempted)
    );
    o
}

/// The per-population table (one row per scenario and population) and the totals.
pub fn render(results: &[ScenarioResult]) -> String {
    render_populations(results) + &totals(results)
}

/// The per-population table alone.
pub fn render_populations(results: &[ScenarioResult]) -> String {
    let rows: Vec<Row> = results
        .iter()
        .flat_map(|r| {
            r.populations.iter().map(|p| Row {
                group: r.scenario.clone(),
                name: p.name.clone(),
                count: 1,
                label: p.label.clone(),
                aqd: p.aqd.clone(),
                naive: p.naive.clone(),
            })
        })
        .collect();
    render_rows(&rows, "scenario")
}

/// The per-family table (populations of the same `eval_family` and label merged across scenarios) and the totals.
pub fn render_families(results: &[ScenarioResult]) -> String {
    let mut rows: Vec<Row> = Vec::new();
    for r in results {
        for p in &r.populations {
            match rows
                .iter_mut()
                .find(|x| x.group == p.family && x.label == p.label)
            {
                Some(x) => {
                    x.aqd.merge(&p.aqd);
                    x.naive.merge(&p.naive);
                    x.count += 1;
                    x.name = format!("{} populations", x.count);
                }
                None => rows.push(Row {
                    group: p.family.clone(),
                    name: "1 population".into(),
                    count: 1,
                    label: p.label.clone(),
                    aqd: p.aqd.clone(),
                    naive: p.naive.clone(),
                }),
            }
        }
    }
    rows.sort_by(|a, b| a.label.cmp(&b.label).then(a.group.cmp(&b.group)));
    render_rows(&rows, "family") + &totals(results)
}

fn trunc(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        s.chars().take(n - 1).collect::<String>() + "…"
    }
}

#[cfg(test)]
mod tests {
    //! The closed loop's mechanics with scripted decisions and the naive baseline (no model involved): blocked
    //! requests fail, the rate class refuses or delays, populations rotate, slow down, pause and change
    //! fingerprint.

    use std::time::Duration;

    use super::*;

    fn decision(scope: Scope, action: Action, ttl_s: u64) -> super::super::ProposedDecision {
        super::super::ProposedDecision {
            scope,
            action,
            ttl: Duration::from_secs(ttl_s),
            score: 1.0,
            reason: "test".into(),
            refresh: false,
        }
    }

    fn scripted(sc: &Scenario, ds: Vec<(f64, super::super::ProposedDecision)>) -> Pass {
        simulate(
            sc,
            Detector::Script {
                decisions: ds,
                observations: 0,
            },
            true,
            None,
        )
    }

    const ONE: &str = r#"
name = "one"
duration = "200s"
seed = 9

[[population]]
name = "worker"
label = "campaign"
sources = 1
fingerprint = "w-client"
rate = 2.0
timing = { kind = "periodic", jitter = 0.0 }
sizes = { kind = "templated", values = [1000], jitter = 0.0 }
"#;

    #[test]
    fn a_blocked_source_gets_nothing_answered_until_the_block_expires() {
        let sc = Scenario::parse(ONE, "unit").expect("parses");
        let ip = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        let p = scripted(&sc, vec![(50.0, decision(Scope::Source(ip), Action::Block, 100))]);
        let o = &p.outcomes[0];
        // 2 req/s for 200 s; blocked from t = 50 s to 150 s.
        assert!((395..=401).contains(&o.attempted), "attempted {}", o.attempted);
        assert!((198..=202).contains(&o.refused), "refused {}", o.refused);
        assert_eq!(o.answered + o.refused, o.attempted);
        assert_eq!((o.hit, o.blocked), (1, 1));
        assert!(
            o.own_times[0] > 49.0 && o.own_times[0] < 51.0,
            "{:?}",
            o.own_times
        );
    }

    #[test]
    fn prefix_and_fingerprint_decisions_cover_their_members() {
        let sc = Scenario::parse(ONE, "unit").expect("parses");
        let px = prefix_of(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)));
        let p = scripted(
            &sc,
            vec![(10.0, decision(Scope::Prefix(px), Action::Block, 1000))],
        );
        assert!(
            p.outcomes[0].answered <= 21,
            "answered {}",
            p.outcomes[0].answered
        );
        let fp = profile("w-client");
        // A fingerprint throttle with a class of 1 packet/s, burst 1, refusing: one request a second passes.
        let text = format!(
            "{ONE}\n[rate_class]\npackets_per_second = 1.1\npacket_burst = 1\nconnections_per_second = 0\n\
             connection_burst = 0\nover = \"refuse\"\n"
        );
        let sc = Scenario::parse(&text, "unit").expect("parses");
        let p = scripted(
            &sc,
            vec![(0.0, decision(Scope::Fingerprint(fp), Action::Throttle, 1000))],
        );
        let o = &p.outcomes[0];
        assert_eq!(o.hit, 1);
        assert_eq!(o.blocked, 0);
        let share = o.answered as f64 / o.attempted as f64;
        assert!(
            (0.4..=0.55).contains(&share),
            "answered {} of {}",
            o.answered,
            o.attempted
        );
        assert_eq!(o.delayed, 0);
    }

    #[test]
    fn the_delay_class_answers_late_and_refuses_beyond_max_delay() {
        // 2 req/s of one packet each against 1 packet/s: the queue grows by 0.5 s a second, max_delay 20 s.
        let text = format!(
            "{ONE}\n[rate_class]\npackets_per_second = 1.1\npacket_burst = 1\nconnections_per_second = 0\n\
             connection_burst = 0\nover = \"delay\"\nmax_delay = \"20s\"\n"
        );
        let sc = Scenario::parse(&text, "unit").expect("parses");
        let ip = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        let p = scripted(
            &sc,
            vec![(0.0, decision(Scope::Source(ip), Action::Throttle, 1000))],
        );
        let o = &p.outcomes[0];
        assert!(
            o.delayed > 0 && o.refused > 0,
            "delayed {} refused {}",
            o.delayed,
            o.refused
        );
        let share = o.answered as f64 / o.attempted as f64;
        assert!(
            (0.45..=0.6).contains(&share),
            "answered {} of {}",
            o.answered,
            o.attempted
        );
    }

    const ADAPTIVE: &str = r#"
name = "adaptive"
duration = "300s"
seed = 11

[[population]]
name = "rotator"
label = "campaign"
sources = 2
fingerprint = "rot-client"
rate = 5.0
timing = { kind = "periodic", jitter = 0.05 }
sizes = { kind = "templated", values = [1000], jitter = 0.0 }

[population.adapt]
on_block = "rotate"
pool = 6
pool_prefixes = 3
"#;

    #[test]
    fn a_rotating_population_moves_to_fresh_addresses_when_the_naive_bucket_blocks_it() {
        let sc = Scenario::parse(ADAPTIVE, "unit").expect("parses");
        let naive = Detector::Naive {
            buckets: HashMap::new(),
            pending: Vec::new(),
            observations: 0,
        };
        let p = simulate(&sc, naive, true, None);
        let o = &p.outcomes[0];
        // 5 req/s overflows the bucket in ~10 s; each block costs notice_after (3) refused requests, then a fresh
        // address; 2 + 6 addresses in all, every one of them blocked in the end.
        assert_eq!(o.active, 8, "addresses used");
        assert_eq!(o.blocked, 8);
        assert!(
            o.answered > 8 * 40,
            "each address gets its bucket's worth: {}",
            o.answered
        );
        assert!(o.refused > 0);
        // Without adaptation only the 2 first addresses exist.
        let fixed = Scenario::parse(
            &ADAPTIVE.replace("on_block = \"rotate\"", "on_block = \"none\""),
            "unit",
        )
        .expect("parses");
        let naive = Detector::Naive {
            buckets: HashMap::new(),
            pending: Vec::new(),
            observations: 0,
        };
        let q = simulate(&fixed, naive, true, None);
        assert_eq!(q.outcomes[0].active, 2);
        assert!(q.outcomes[0].answered < o.answered);
    }

    #[test]
    fn slow_pause_and_fingerprint_changes_shape_the_traffic() {
        let ip = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        let block = || vec![(20.0, decision(Scope::Source(ip), Action::Block, 10_000))];
        let slow = format!("{ONE}\n[population.adapt]\non_block = \"slow\"\nslow_factor = 0.1\n");
        let sc = Scenario::parse(&slow, "unit").expect("parses");
        let base = scripted(&Scenario::parse(ONE, "unit").expect("parses"), block());
        let slowed = scripted(&sc, block());
        assert!(
            slowed.outcomes[0].attempted < base.outcomes[0].attempted / 2,
            "slowed {} vs {}",
            slowed.outcomes[0].attempted,
            base.outcomes[0].attempted
        );
        let pause = format!("{ONE}\n[population.adapt]\npause_every = \"100s\"\npause_for = \"50s\"\n");
        let sc = Scenario::parse(&pause, "unit").expect("parses");
        let paused = scripted(&sc, vec![]);
        let a = paused.outcomes[0].attempted;
        assert!((195..=205).contains(&a), "half the time quiet: {a}");
        // A fingerprint throttle stops covering the population once it moves to a fresh JA4.
        let every = format!(
            "{ONE}\n[rate_class]\nover = \"refuse\"\npackets_per_second = 0.1\npacket_burst = 1\n\
             [population.adapt]\nfingerprint_every = \"50s\"\n"
        );
        let sc = Scenario::parse(&every, "unit").expect("parses");
        let fp = profile("w-client");
        let p = scripted(
            &sc,
            vec![(0.0, decision(Scope::Fingerprint(fp), Action::Throttle, 10_000))],
        );
        let o = &p.outcomes[0];
        // Refused for the first 50 s (but about one in ten), answered afterwards.
        assert!(o.refused > 80 && o.refused < 100, "refused {}", o.refused);
    }
}

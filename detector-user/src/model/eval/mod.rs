//! The evaluation harness: generates a scenario's observation stream on a simulated clock, drives the real
//! [`Model`](super::Model) with it (ticking once per simulated second), and reports per population how many
//! sources were throttled or blocked and how fast, side by side with a naive per-IP leaky bucket (capacity 40,
//! one leak per 0.5 s, overflow = blocked; CrowdSec's `http-crawl-non_statics`).
//!
//! Open loop: a decision does not change what the simulated sources send. Deterministic for a given seed.

pub mod scenario;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use ipnet::IpNet;
use serde::Serialize;

use super::{Action, FingerprintId, FpKey, Model, ModelConfig, Observation, Scope, WeightsFile, prefix_of};
pub use scenario::{Label, Population, Scenario, ScenarioError, Sizes, Timing};

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

/// One simulated source.
struct Src {
    pop: usize,
    addr: IpAddr,
    fp: FpKey,
    burst_left: u32,
    flow_seq: u64,
    /// Requests sent on each of the source's parallel connections (0 = closed).
    flows: Vec<(u64, u32)>,
    next_flow: usize,
    first_req_s: Option<f64>,
    hit_s: Option<f64>,
    block_s: Option<f64>,
    monitor_s: Option<f64>,
    bucket: f64,
    bucket_t: f64,
    naive_s: Option<f64>,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    /// The source's own timing process fires (and reschedules itself).
    Next(u32),
    /// One request of a source, scheduled by a population-level process.
    Once(u32),
    /// A population-level round (lockstep) or synchronized burst trigger.
    Round(u32),
}

/// Per-population outcome.
#[derive(Clone, Debug, Serialize)]
pub struct PopulationResult {
    pub name: String,
    pub label: String,
    pub sources: u32,
    /// Sources that sent at least one request (the denominator of the shares).
    pub active: u32,
    pub requests: u64,
    pub aqd: Outcome,
    pub naive: Outcome,
    /// Sources at least monitored by aqd.
    pub aqd_monitored: u32,
}

/// Throttled-or-blocked outcome for one detector.
#[derive(Clone, Debug, Serialize)]
pub struct Outcome {
    /// Sources throttled or blocked at some point (for benign populations: false positives).
    pub hit: u32,
    pub blocked: u32,
    /// Hit within [`FAST_S`] seconds of the population start.
    pub hit_fast: u32,
    /// Median / worst time from population start to the first decision over the hit sources (s).
    pub t_median_s: Option<f64>,
    pub t_max_s: Option<f64>,
}

/// One scenario's outcome.
#[derive(Clone, Debug, Serialize)]
pub struct ScenarioResult {
    pub scenario: String,
    pub description: String,
    pub duration_s: f64,
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

fn addr_for(family: scenario::Family, prefix_no: u32, host: u32) -> IpAddr {
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
            (prefix_no >> 16) as u16,
            prefix_no as u16,
            0,
            0,
            (host >> 16) as u16,
            1 + host as u16,
        )),
    }
}

/// Runs one scenario with the given model weights and config overrides.
pub fn run(sc: &Scenario, weights: &WeightsFile, probe: Option<Probe<'_>>) -> ScenarioResult {
    let started = std::time::Instant::now();
    let start_unix_ns = (DAY0_UNIX_S as i128 * 1_000_000_000 + (sc.start_hour * 3600e9) as i128) as i64;
    let cfg = ModelConfig {
        wall_offset_ns: start_unix_ns - MONO0_NS as i64,
        release_unix_s: sc.release_at.map(|r| (start_unix_ns as f64 / 1e9 + r.0) as i64),
        max_sources: 200_000,
        ..ModelConfig::default()
    };
    let mut model = Model::with_weights(cfg, weights.clone()).expect("weights compile");
    let mut rng = Rng::new(sc.seed);

    // Sources.
    let mut srcs: Vec<Src> = Vec::new();
    let mut prefix_no = 0u32;
    let mut by_addr: HashMap<IpAddr, u32> = HashMap::new();
    let mut by_prefix: HashMap<IpNet, Vec<u32>> = HashMap::new();
    let mut by_fp: HashMap<FpKey, Vec<u32>> = HashMap::new();
    let mut truth = Truth {
        source: HashMap::new(),
        fingerprint: HashMap::new(),
        prefix: HashMap::new(),
    };
    for (pi, p) in sc.populations.iter().enumerate() {
        let np = p.prefixes.unwrap_or(p.sources);
        let shared = (p.fingerprint != "unique").then(|| model.intern(profile(&p.fingerprint)));
        for i in 0..p.sources {
            let addr = addr_for(p.family, prefix_no + i % np, i / np);
            let fp = shared.unwrap_or_else(|| {
                model.intern(FingerprintId {
                    ja4: Some(Arc::from(format!("u13d0000h2_{}_{i}", p.name))),
                    syn_key: rng.next_u64(),
                })
            });
            let idx = srcs.len() as u32;
            by_addr.insert(addr, idx);
            by_prefix.entry(prefix_of(addr)).or_default().push(idx);
            by_fp.entry(fp).or_default().push(idx);
            truth.source.insert(addr, p.label);
            srcs.push(Src {
                pop: pi,
                addr,
                fp,
                burst_left: 0,
                flow_seq: 0,
                flows: vec![(0, 0); p.concurrency as usize],
                next_flow: 0,
                first_req_s: None,
                hit_s: None,
                block_s: None,
                monitor_s: None,
                bucket: 0.0,
                bucket_t: 0.0,
                naive_s: None,
            });
        }
        prefix_no += np;
    }
    let share = |ids: &Vec<u32>, srcs: &Vec<Src>| {
        ids.iter()
            .filter(|&&i| sc.populations[srcs[i as usize].pop].label == Label::Campaign)
            .count() as f64
            / ids.len().max(1) as f64
    };
    for (k, ids) in &by_fp {
        truth.fingerprint.insert(k.0, share(ids, &srcs));
    }
    for (k, ids) in &by_prefix {
        truth.prefix.insert(*k, share(ids, &srcs));
    }

    let mut pop_members: Vec<Vec<u32>> = vec![Vec::new(); sc.populations.len()];
    for (i, s) in srcs.iter().enumerate() {
        pop_members[s.pop].push(i as u32);
    }

    // Initial events.
    let mut heap: BinaryHeap<Reverse<(u64, Ev)>> = BinaryHeap::new();
    let to_ns = |s: f64| (s.max(0.0) * 1e9) as u64;
    for (pi, p) in sc.populations.iter().enumerate() {
        let (start, _) = sc.window(p);
        match p.timing {
            Timing::Lockstep { .. } => heap.push(Reverse((to_ns(start), Ev::Round(pi as u32)))),
            Timing::Bursty {
                synchronized: true,
                burst,
                ..
            } => heap.push(Reverse((
                to_ns(start + rng.exp(burst as f64 / p.rate).min(5.0)),
                Ev::Round(pi as u32),
            ))),
            _ => {}
        }
    }
    for (i, s) in srcs.iter().enumerate() {
        let p = &sc.populations[s.pop];
        let (start, _) = sc.window(p);
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
    let mut decisions = 0usize;
    let end = sc.duration.0;
    let mut requests = vec![0u64; sc.populations.len()];

    let mut apply = |ds: Vec<super::ProposedDecision>, t: f64, srcs: &mut Vec<Src>| {
        decisions += ds.len();
        for d in ds {
            let ids: Vec<u32> = match &d.scope {
                Scope::Source(a) => by_addr.get(a).map(|&i| vec![i]).unwrap_or_default(),
                Scope::Prefix(n) => by_prefix.get(n).cloned().unwrap_or_default(),
                Scope::Fingerprint(id) => by_fp.get(&id.key()).cloned().unwrap_or_default(),
            };
            for i in ids {
                let s = &mut srcs[i as usize];
                match d.action {
                    Action::Monitor => {
                        s.monitor_s.get_or_insert(t);
                    }
                    Action::Throttle => {
                        s.hit_s.get_or_insert(t);
                    }
                    Action::Block => {
                        s.hit_s.get_or_insert(t);
                        s.block_s.get_or_insert(t);
                    }
                }
            }
        }
    };

    loop {
        let next_ev = heap
            .peek()
            .map_or(f64::INFINITY, |Reverse((t, _))| *t as f64 * 1e-9);
        // Ticks and probes due before the next event.
        while next_tick <= next_ev.min(end) || next_probe <= next_ev.min(end) {
            if next_probe < next_tick {
                let pr = probe.as_mut().expect("a probe is set");
                (pr.f)(&model, MONO0_NS + to_ns(next_probe), &truth);
                next_probe += pr.every_s;
            } else {
                let ds = model.tick(MONO0_NS + to_ns(next_tick), &());
                apply(ds, next_tick, &mut srcs);
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
                let members = pop_members[pi as usize].iter().copied();
                match p.timing {
                    Timing::Lockstep {
                        jitter,
                        participation,
                    } => {
                        for i in members {
                            if rng.f64() < participation {
                                heap.push(Reverse((t_ns + to_ns(rng.f64() * jitter.0), Ev::Once(i))));
                            }
                        }
                        let next = t + (1.0 / p.rate) * (0.9 + 0.2 * rng.f64());
                        if next < pend {
                            heap.push(Reverse((to_ns(next), Ev::Round(pi))));
                        }
                    }
                    Timing::Bursty { burst, spread, .. } => {
                        for i in members {
                            srcs[i as usize].burst_left = burst;
                            heap.push(Reverse((t_ns + to_ns(rng.f64() * spread.0), Ev::Next(i))));
                        }
                        let next = t + rng.exp(burst as f64 / p.rate);
                        if next < pend {
                            heap.push(Reverse((to_ns(next), Ev::Round(pi))));
                        }
                    }
                    _ => {}
                }
            }
            Ev::Next(i) | Ev::Once(i) => {
                let si = i as usize;
                let p = &sc.populations[srcs[si].pop];
                let (_, pend) = sc.window(p);
                if t >= pend {
                    continue;
                }
                requests[srcs[si].pop] += 1;
                let bytes = sample_size(&p.sizes, &mut rng);
                emit_request(&mut model, &mut srcs[si], p, t, t_ns, bytes, &mut rng);
                if let Ev::Next(_) = ev {
                    let gap = match p.timing {
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
                                        * (0.5
                                            + 0.5 * (std::f64::consts::TAU * (h - peak_hour) / 24.0).cos());
                                if rng.f64() < m || tt > pend {
                                    break;
                                }
                            }
                            Some(tt - t)
                        }
                        Timing::Human { think, session, idle } => {
                            let s = &mut srcs[si];
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
                            let s = &mut srcs[si];
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
                    };
                    if let Some(g) = gap {
                        let next = t + g;
                        if next < pend {
                            heap.push(Reverse((to_ns(next), Ev::Next(i))));
                        }
                    }
                }
            }
        }
    }

    // Results.
    let mut pops = Vec::new();
    for (pi, p) in sc.populations.iter().enumerate() {
        let (start, _) = sc.window(p);
        let members: Vec<&Src> = srcs
            .iter()
            .filter(|s| s.pop == pi && s.first_req_s.is_some())
            .collect();
        let outcome = |get: &dyn Fn(&Src) -> Option<f64>, blocked: &dyn Fn(&Src) -> bool| {
            let mut times: Vec<f64> = members
                .iter()
                .filter_map(|s| get(s).map(|t| t.max(s.first_req_s.unwrap_or(t)) - start))
                .collect();
            times.sort_by(f64::total_cmp);
            Outcome {
                hit: times.len() as u32,
                blocked: members.iter().filter(|s| blocked(s)).count() as u32,
                hit_fast: times.iter().filter(|&&t| t <= FAST_S).count() as u32,
                t_median_s: times.get(times.len() / 2).copied(),
                t_max_s: times.last().copied(),
            }
        };
        pops.push(PopulationResult {
            name: p.name.clone(),
            label: match p.label {
                Label::Benign => "benign".into(),
                Label::Campaign => "campaign".into(),
            },
            sources: p.sources,
            active: members.len() as u32,
            requests: requests[pi],
            aqd: outcome(&|s| s.hit_s, &|s| s.block_s.is_some()),
            naive: outcome(&|s| s.naive_s, &|s| s.naive_s.is_some()),
            aqd_monitored: members
                .iter()
                .filter(|s| s.monitor_s.is_some() || s.hit_s.is_some())
                .count() as u32,
        });
    }
    ScenarioResult {
        scenario: sc.name.clone(),
        description: sc.description.clone(),
        duration_s: sc.duration.0,
        observations: model.stats().observations,
        decisions,
        wall_ms: started.elapsed().as_millis(),
        populations: pops,
        memory_bytes: model.memory_report().total_bytes,
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

fn emit_request(
    model: &mut Model,
    s: &mut Src,
    p: &Population,
    t: f64,
    t_ns: u64,
    bytes: u32,
    rng: &mut Rng,
) {
    let now = MONO0_NS + t_ns;
    s.first_req_s.get_or_insert(t);
    // The naive baseline.
    s.bucket = (s.bucket - (t - s.bucket_t) / 0.5).max(0.0) + 1.0;
    s.bucket_t = t;
    if s.bucket > 40.0 && s.naive_s.is_none() {
        s.naive_s = Some(t);
    }
    let fi = s.next_flow;
    s.next_flow = (s.next_flow + 1) % s.flows.len();
    if s.flows[fi].1 == 0 {
        s.flow_seq += 1;
        s.flows[fi].0 = s.flow_seq;
        model.observe(&Observation::ConnOpen {
            time_ns: now,
            src: s.addr,
            flow: s.flow_seq,
            fp: s.fp,
        });
    }
    let flow = s.flows[fi].0;
    let packets = (bytes / 1400 + 1).min(u16::MAX as u32) as u16;
    model.observe(&Observation::Request {
        time_ns: now,
        src: s.addr,
        flow,
        fp: s.fp,
        bytes,
        packets,
    });
    s.flows[fi].1 += 1;
    if s.flows[fi].1 >= p.requests_per_conn {
        let n = s.flows[fi].1;
        s.flows[fi].1 = 0;
        let server = (rng.f64() * 20_000.0) as u64 * n as u64;
        model.observe(&Observation::ConnClose {
            time_ns: now + 1_000_000,
            src: s.addr,
            flow,
            fp: s.fp,
            requests: n,
            client_bytes: 0,
            server_bytes_est: server,
        });
    }
}

fn pct(n: u32, d: u32) -> String {
    if d == 0 {
        "-".into()
    } else {
        format!("{:.1}%", 100.0 * n as f64 / d as f64)
    }
}

fn secs(v: Option<f64>) -> String {
    v.map_or("-".into(), |t| format!("{t:.1}"))
}

/// The table for a set of results.
pub fn render(results: &[ScenarioResult]) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{:<18} {:<22} {:>8} {:>6} | {:>7} {:>7} {:>7} {:>7} {:>7} | {:>7} {:>7} {:>7}",
        "scenario",
        "population",
        "label",
        "active",
        "aqd hit",
        "≤10s",
        "t50 s",
        "tmax s",
        "blocked",
        "naive",
        "≤10s",
        "t50 s"
    );
    let (mut camp, mut camp_fast, mut camp_hit, mut ben, mut ben_hit, mut ben_block) = (0, 0, 0, 0, 0, 0);
    let (mut n_camp_fast, mut n_camp_hit, mut n_ben_hit) = (0, 0, 0);
    for r in results {
        for p in &r.populations {
            let _ = writeln!(
                o,
                "{:<18} {:<22} {:>8} {:>6} | {:>7} {:>7} {:>7} {:>7} {:>7} | {:>7} {:>7} {:>7}",
                trunc(&r.scenario, 18),
                trunc(&p.name, 22),
                p.label,
                p.active,
                pct(p.aqd.hit, p.active),
                pct(p.aqd.hit_fast, p.active),
                secs(p.aqd.t_median_s),
                secs(p.aqd.t_max_s),
                pct(p.aqd.blocked, p.active),
                pct(p.naive.hit, p.active),
                pct(p.naive.hit_fast, p.active),
                secs(p.naive.t_median_s),
            );
            if p.label == "campaign" {
                camp += p.active;
                camp_fast += p.aqd.hit_fast;
                camp_hit += p.aqd.hit;
                n_camp_fast += p.naive.hit_fast;
                n_camp_hit += p.naive.hit;
            } else {
                ben += p.active;
                ben_hit += p.aqd.hit;
                ben_block += p.aqd.blocked;
                n_ben_hit += p.naive.hit;
            }
        }
    }
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "campaign sources throttled/blocked: aqd {} ({} within {FAST_S:.0} s of campaign start), naive {} ({} within {FAST_S:.0} s)",
        pct(camp_hit, camp),
        pct(camp_fast, camp),
        pct(n_camp_hit, camp),
        pct(n_camp_fast, camp)
    );
    let _ = writeln!(
        o,
        "benign sources hit: aqd {ben_hit} of {ben} throttled or blocked, {ben_block} blocked; naive {n_ben_hit} blocked"
    );
    o
}

fn trunc(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        s.chars().take(n - 1).collect::<String>() + "…"
    }
}

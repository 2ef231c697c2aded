//! Unit tests of the model: features on hand-made inputs, policy tiers, memory bounds, and small scenarios run
//! through the real harness (a hydra is caught, honest heavy users and browsers are not).

use std::net::{IpAddr, Ipv4Addr};

use super::eval::{self, Scenario};
use super::features::{self, GroupState, SIZE_BUCKETS, SourceState, hist_stats_for_test, size_bucket};
use super::policy::{PolicyConfig, PolicyState};
use super::*;

const S: u64 = 1_000_000_000;

fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

fn feature(name: &str, x: &[f32]) -> f32 {
    x[SOURCE_FEATURES
        .iter()
        .position(|n| *n == name)
        .expect("known feature")]
}

#[test]
fn size_buckets_are_thirds_of_an_octave() {
    assert_eq!(size_bucket(128), 0);
    assert_eq!(size_bucket(1), 0);
    assert_eq!(size_bucket(256), 3);
    assert_eq!(size_bucket(1024), 9);
    assert_eq!(size_bucket(u32::MAX), SIZE_BUCKETS - 1);
}

#[test]
fn histogram_entropy_and_top_share() {
    let mut h = [0u8; SIZE_BUCKETS];
    h[3] = 10;
    h[7] = 10;
    h[9] = 10;
    h[12] = 10;
    let (top, ent, n) = hist_stats_for_test(&h);
    assert_eq!(n, 40.0);
    assert!((top - 0.5).abs() < 1e-6, "top-two share {top}");
    assert!((ent - 2.0 / 5.0).abs() < 1e-6, "entropy {ent} (2 bits / 5)");
    let mut one = [0u8; SIZE_BUCKETS];
    one[5] = 200;
    let (top, ent, _) = hist_stats_for_test(&one);
    assert_eq!((top, ent), (1.0, 0.0));
}

#[test]
fn rate_regularity_and_repetition_of_a_metronome() {
    let mut s = SourceState::new(10 * S, 7);
    // 2 requests/s for 60 s, exactly periodic, always 1500 bytes.
    for i in 0..120u64 {
        s.request(10 * S + i * S / 2, 1500, 0);
    }
    let now = 10 * S + 120 * S / 2;
    let x = s.features(now, 0, &Default::default(), &Default::default());
    let rate = feature("rate", &x);
    assert!(
        (rate - 3f32.ln()).abs() < 0.15,
        "rate feature {rate}, expected ~ln(1 + 2)"
    );
    assert!(
        feature("regularity", &x) > 0.95,
        "regularity {}",
        feature("regularity", &x)
    );
    assert!(feature("size_repetition", &x) > 0.95);
    assert!(feature("size_entropy", &x) < 0.05);
}

#[test]
fn poisson_timing_has_regularity_near_one_half() {
    let mut rng = eval::Rng::new(3);
    let mut s = SourceState::new(S, 1);
    let mut t = S as f64;
    for _ in 0..3000 {
        t += rng.exp(0.5) * 1e9;
        s.request(t as u64, 100 + rng.below(50_000) as u32, 0);
    }
    let r = s.regularity();
    assert!((0.35..0.65).contains(&r), "Poisson regularity {r}");
    let x = s.features(t as u64, 0, &Default::default(), &Default::default());
    assert!(
        feature("size_repetition", &x) < 0.5,
        "uniform sizes are not repetitive"
    );
}

#[test]
fn duty_cycle_counts_distinct_hours_of_the_last_day() {
    let mut s = SourceState::new(S, 1);
    for h in 0..6u32 {
        s.request((h as u64 * 3600 + 1) * S, 500, 1000 + h);
    }
    let x = s.features(6 * 3600 * S, 1005, &Default::default(), &Default::default());
    assert!((feature("duty_cycle", &x) - 6.0 / 24.0).abs() < 1e-6);
    // A day later, all of it has aged out.
    let x = s.features(40 * 3600 * S, 1040, &Default::default(), &Default::default());
    assert_eq!(feature("duty_cycle", &x), 0.0);
}

#[test]
fn lockstep_members_are_coactive_and_the_cluster_is_dispersed() {
    // 50 sources firing within the same second every 5 s vs. 50 sources spread evenly.
    let run = |lockstep: bool| {
        let mut g = GroupState::new(0);
        let mut srcs: Vec<SourceState> = (0..50).map(|_| SourceState::new(0, 9)).collect();
        for round in 0..60u64 {
            for (i, s) in srcs.iter_mut().enumerate() {
                let t = if lockstep {
                    round * 5 * S + i as u64 * 10_000_000
                } else {
                    round * 5 * S + i as u64 * S / 10
                };
                let (first_slot, first_epoch) = s.request(t, 1000, 0);
                let others = g.request(t, 1000, 0, first_slot, first_epoch, false);
                if first_slot {
                    s.coact_sample(((others as f32 + 1.0) / (g.expected_others() + 1.0)).ln());
                }
            }
        }
        (g.dispersion(), srcs[25].coact)
    };
    let (d_lock, c_lock) = run(true);
    let (d_spread, c_spread) = run(false);
    assert!(d_lock > 20.0, "lockstep dispersion {d_lock}");
    assert!(d_spread < 2.0, "spread dispersion {d_spread}");
    assert!(
        c_lock > 1.0 && c_spread < 0.5,
        "coactivity lockstep {c_lock}, spread {c_spread}"
    );
}

#[test]
fn policy_hysteresis_sustained_block_escalation_and_decay() {
    let cfg = PolicyConfig::default();
    let mut p = PolicyState::default();
    assert_eq!(p.step(0.4, 100, &cfg, 3), None);
    let s = p.step(0.85, 101, &cfg, 3).expect("throttle");
    assert_eq!((s.action, s.ttl_s), (Action::Throttle, 600));
    assert_eq!(p.strikes, 1);
    // Between leave (0.6) and enter (0.8): held, no new decision.
    assert_eq!(p.step(0.7, 102, &cfg, 3), None);
    assert_eq!(p.current(102), 2);
    // Block only after 30 s above block_enter.
    assert_eq!(p.step(0.97, 110, &cfg, 3), None);
    assert_eq!(p.step(0.97, 130, &cfg, 3), None);
    let s = p.step(0.97, 140, &cfg, 3).expect("block");
    assert_eq!(s.action, Action::Block);
    // Capped tier (fingerprint clusters).
    let mut q = PolicyState::default();
    assert_eq!(q.step(0.99, 10, &cfg, 1).map(|s| s.action), Some(Action::Monitor));
    // Repeat offender: TTLs double, and at 3 strikes a throttle is a block.
    let mut r = PolicyState::default();
    let mut t = 1000;
    let mut ttls = vec![];
    for _ in 0..3 {
        let s = r.step(0.85, t, &cfg, 3).expect("decision");
        ttls.push((s.action, s.ttl_s));
        t += 5000; // long after expiry
    }
    assert_eq!(
        ttls,
        vec![
            (Action::Throttle, 600),
            (Action::Throttle, 1200),
            (Action::Throttle, 2400)
        ]
    );
    assert_eq!(r.step(0.85, t, &cfg, 3).map(|s| s.action), Some(Action::Block));
    // Strikes decay after a quiet day.
    let before = r.strikes;
    r.step(0.0, t + 2 * 86_400, &cfg, 3);
    assert!(r.strikes < before);
}

#[test]
fn memory_per_source_is_at_most_256_bytes_at_a_million() {
    let m = Model::new(ModelConfig {
        prealloc: true,
        max_sources: 1_000_000,
        ..ModelConfig::default()
    });
    let r = m.memory_report();
    let per = r.source_bytes as f64 / 1_000_000.0;
    assert!(per <= 256.0, "{per:.1} bytes per source at 1,000,000");
    assert!(
        super::size_of_source_state() <= 176,
        "state {} bytes",
        super::size_of_source_state()
    );
}

#[test]
fn the_source_table_evicts_beyond_its_cap() {
    let mut m = Model::new(ModelConfig {
        max_sources: 100,
        ..ModelConfig::default()
    });
    for i in 0..1000u32 {
        let src = v4(10, (i >> 8) as u8, i as u8, 1);
        m.observe(&Observation::Request {
            time_ns: (i as u64 + 1) * S,
            src,
            flow: 1,
            fp: FpKey(5),
            bytes: 900,
            packets: 1,
        });
    }
    let r = m.memory_report();
    assert_eq!(r.sources, 100);
    assert_eq!(r.evicted_sources, 900);
    // The most recent source is kept.
    assert!(m.explain_source(v4(10, 3, 231, 1), 1001 * S, &()).is_some());
}

#[test]
fn shipped_weights_parse_and_unknown_features_are_rejected() {
    let w = WeightsFile::shipped();
    assert!(w.compile().is_ok());
    let bad = DEFAULT_WEIGHTS.replacen("[source.weights]", "[source.weights]\nno_such_feature = 1.0", 1);
    match WeightsFile::parse(&bad).and_then(|w| w.compile().map(|_| ())) {
        Err(WeightsError::UnknownFeature { name, .. }) => assert_eq!(name, "no_such_feature"),
        other => panic!("expected an unknown-feature error, got {other:?}"),
    }
}

const HYDRA: &str = r#"
name = "unit-hydra"
duration = "6m"
seed = 9

[[population]]
name = "hydra"
label = "campaign"
sources = 200
prefixes = 100
fingerprint = "unit-hydra-client"
rate = 0.2
timing = { kind = "lockstep", jitter = "400ms", participation = 0.8 }
sizes = { kind = "templated", values = [1200, 2400], jitter = 0.04 }
start = "3m"

[[population]]
name = "heavy-honest"
label = "benign"
sources = 3
fingerprint = "unique"
rate = 4.0
timing = { kind = "poisson" }
sizes = { kind = "lognormal", median = 2000, sigma = 1.0 }
concurrency = 4

[[population]]
name = "browsers"
label = "benign"
sources = 300
fingerprint = "chrome"
timing = { kind = "human", think = "15s", session = 10, idle = "3m" }
sizes = { kind = "lognormal", median = 900, sigma = 1.2 }
"#;

#[test]
fn a_hydra_is_caught_and_honest_heavy_users_and_browsers_are_not() {
    let sc = Scenario::parse(HYDRA, "unit").expect("scenario parses");
    let r = eval::run(&sc, &WeightsFile::shipped(), None);
    let pop = |n: &str| r.populations.iter().find(|p| p.name == n).expect("population");
    let hydra = pop("hydra");
    assert!(
        hydra.aqd.hit as f64 >= 0.95 * hydra.active as f64,
        "hydra: {} of {} hit",
        hydra.aqd.hit,
        hydra.active
    );
    assert!(
        hydra.naive.hit == 0,
        "each hydra source stays under the naive bucket"
    );
    for n in ["heavy-honest", "browsers"] {
        assert_eq!(pop(n).aqd.hit, 0, "{n} must not be throttled or blocked");
    }
    assert!(
        pop("heavy-honest").naive.hit > 0,
        "the naive bucket blocks the heavy honest users"
    );
}

#[test]
fn allowlisted_sources_and_prefixes_get_no_decisions_and_explanations_add_up() {
    let sc = Scenario::parse(HYDRA, "unit").expect("scenario parses");
    let allowed: Vec<IpNet> = vec!["10.0.0.0/16".parse().expect("net")];
    let mut checked = false;
    let mut f = |m: &Model, now: u64, _: &eval::Truth| {
        if now < 1_000 * S + 330 * S || checked {
            return;
        }
        checked = true;
        // Every hydra source here is in 10.0.0.0/16 (allowed): the model's own tick is not called with this
        // allowlist, so check what explain says and what a tick on a clone of the state would do instead.
        let top = m.top(Kind::Source, 5, now);
        assert!(!top.is_empty() && top[0].score > 0.9, "top sources: {top:?}");
        let Scope::Source(a) = top[0].scope else {
            panic!("source scope")
        };
        let e = m.explain_source(a, now, &allowed).expect("tracked");
        let logit: f64 = e.bias + e.features.iter().map(|c| c.contribution).sum::<f64>();
        assert!(
            (1.0 / (1.0 + (-logit).exp()) - e.score).abs() < 1e-3,
            "contributions add up to the score"
        );
        assert!(
            e.why_not_blocked
                .as_deref()
                .is_some_and(|w| w.contains("allowlisted"))
        );
        let json = serde_json::to_string(&e).expect("serialises");
        assert!(json.contains("\"fp_cluster\""));
    };
    eval::run(
        &sc,
        &WeightsFile::shipped(),
        Some(eval::Probe {
            every_s: 10.0,
            f: &mut f,
        }),
    );
    assert!(checked);

    // A real tick with an allowlist covering the campaign: nothing proposed against it.
    let mut m = Model::new(ModelConfig::default());
    let fp = m.intern(eval::profile("unit-hydra-client"));
    let mut out = Vec::new();
    for round in 0..40u64 {
        for i in 0..100u32 {
            let src = v4(10, 9, (i % 50) as u8, 1 + (i / 50) as u8);
            let t = 1_000 * S + round * 5 * S + i as u64 * 3_000_000;
            m.observe(&Observation::Request {
                time_ns: t,
                src,
                flow: i as u64,
                fp,
                bytes: 1200,
                packets: 1,
            });
        }
        out.extend(m.tick(1_000 * S + round * 5 * S + 2 * S, &allowed));
    }
    let allowed_hit = out.iter().any(|d| match &d.scope {
        Scope::Source(a) => allowed.as_slice().allows(*a),
        Scope::Prefix(n) => allowed.as_slice().allows_any_in(n),
        Scope::Fingerprint(_) => false,
    });
    assert!(!allowed_hit, "decisions against allowlisted space: {out:?}");
}

#[test]
fn fast_size_bucket_and_exp_match_the_reference() {
    for b in (1..200_000u32)
        .step_by(7)
        .chain([127, 128, 129, 143, 144, 181, 182, 228, 229, u32::MAX])
    {
        let reference = ((3.0 * (b as f64).log2() - 21.0).round().max(0.0) as usize).min(SIZE_BUCKETS - 1);
        assert_eq!(size_bucket(b), reference, "bucket of {b} bytes");
    }
    for i in 0..2000 {
        let x = -(i as f32) * 0.01;
        let (a, e) = (features::exp_neg(x), x.exp());
        assert!((a - e).abs() <= 3e-5 * e + 1e-30, "exp({x}) = {e}, got {a}");
    }
}

const NOISE_AND_TOOL: &str = r#"
name = "unit-noise-tool"
duration = "8m"
seed = 17

[[population]]
name = "noise"
label = "benign"
sources = 500
prefixes = 2
fingerprint = "unit-noise"
rate = 1.0
timing = { kind = "poisson" }
sizes = { kind = "uniform", min = 200, max = 8200 }

[[population]]
name = "heavy-honest"
label = "benign"
sources = 3
fingerprint = "unique"
rate = 5.0
timing = { kind = "poisson" }
sizes = { kind = "lognormal", median = 2200, sigma = 0.9 }
concurrency = 4

[[population]]
name = "extractor"
label = "campaign"
sources = 1
fingerprint = "unit-extractor"
rate = 5.0
timing = { kind = "periodic", jitter = 0.1 }
sizes = { kind = "templated", values = [1300, 2100, 2700], jitter = 0.03 }
concurrency = 6
start = "3m"
"#;

/// Uniformly random traffic is no campaign (the benchmark's old 91,601 proposals came from two requests that
/// landed in a cluster's top size buckets by chance), and a single heavy templated metronome is caught by the
/// single-source tool rule while heavy honest users with Poisson timing and diverse sizes are not.
#[test]
fn random_traffic_proposes_nothing_and_a_single_source_tool_is_caught() {
    let sc = Scenario::parse(NOISE_AND_TOOL, "unit").expect("scenario parses");
    let r = eval::run(&sc, &WeightsFile::shipped(), None);
    let pop = |n: &str| r.populations.iter().find(|p| p.name == n).expect("population");
    assert_eq!(
        pop("noise").aqd_monitored,
        0,
        "random sources must not even be monitored"
    );
    assert_eq!(
        pop("heavy-honest").aqd.hit,
        0,
        "heavy honest users must not be hit"
    );
    let x = pop("extractor");
    assert_eq!(
        x.aqd.hit, 1,
        "the single-source extractor must be throttled or blocked"
    );
    assert!(
        x.aqd.t_median_s.is_some_and(|t| t <= 60.0),
        "caught after {:?} s",
        x.aqd.t_median_s
    );
}

/// A new lockstep cluster with its own fingerprint is throttled as a whole within seconds, so its members are
/// decided on their first request (the previous model needed ~10 s for half of them).
#[test]
fn a_new_hydra_cluster_is_decided_within_seconds() {
    let sc = Scenario::parse(HYDRA, "unit").expect("scenario parses");
    let r = eval::run(&sc, &WeightsFile::shipped(), None);
    let hydra = r
        .populations
        .iter()
        .find(|p| p.name == "hydra")
        .expect("population");
    assert!(
        hydra.aqd.hit_fast as f64 >= 0.9 * hydra.active as f64,
        "hydra: {} of {} within 10 s (median {:?} s)",
        hydra.aqd.hit_fast,
        hydra.active,
        hydra.aqd.t_median_s
    );
}

/// The rescan after a cluster turns suspicious is bounded per tick, so tick() stays cheap with many sources.
#[test]
fn the_rescan_after_a_flag_is_bounded_per_tick() {
    let mut m = Model::new(ModelConfig::default());
    let n = super::RESCAN_PER_TICK as u32 + 10_000;
    for i in 0..n {
        m.observe(&Observation::Request {
            time_ns: 1_000 * S + i as u64 * 1_000,
            src: v4(10, (i >> 16) as u8, (i >> 8) as u8, i as u8),
            flow: 1,
            fp: FpKey(7),
            bytes: 1000,
            packets: 1,
        });
    }
    m.last_rescan_ns = 0;
    if let Some(g) = m.fps.get_mut(&7) {
        g.score = 0.0;
    }
    m.rescan_left = m.sources.len();
    m.tick(1_002 * S, &());
    assert_eq!(m.rescan_left, n as usize - super::RESCAN_PER_TICK);
    m.tick(1_003 * S, &());
    assert_eq!(m.rescan_left, 0);
}

#[test]
fn scheduled_bursts_separate_ci_runners_from_continuous_and_slow_sources() {
    let sched = |x: &[f32]| feature("scheduled_bursts", x);
    // A CI runner: bursts of 30 requests 1 s apart every 5 minutes.
    let mut ci = SourceState::new(S, 1);
    let mut t = S;
    for _burst in 0..3 {
        for i in 0..30u64 {
            ci.request(t + i * S, 1500, 0);
        }
        t += 300 * S;
    }
    let last = t - 300 * S + 29 * S;
    let x = ci.features(last, 0, &Default::default(), &Default::default());
    assert!(sched(&x) > 0.9, "ci runner: scheduled_bursts {}", sched(&x));
    // Before its first idle gap it is not one yet (no rhythm seen).
    let mut young = SourceState::new(S, 1);
    for i in 0..30u64 {
        young.request(S + i * S, 1500, 0);
    }
    let x = young.features(31 * S, 0, &Default::default(), &Default::default());
    assert_eq!(sched(&x), 0.0);
    // A hydra member firing every 5 s for 15 minutes: continuous, never idle.
    let mut hydra = SourceState::new(S, 2);
    for i in 0..180u64 {
        hydra.request(S + i * 5 * S, 1500, 0);
    }
    let x = hydra.features(S + 180 * 5 * S, 0, &Default::default(), &Default::default());
    assert_eq!(sched(&x), 0.0, "continuous source");
    // Slow and low: Poisson at 0.02 requests/s — mostly idle, but its gaps are not dense bursts.
    let mut rng = eval::Rng::new(11);
    let mut slow = SourceState::new(S, 3);
    let mut t = S as f64;
    for _ in 0..60 {
        t += rng.exp(50.0) * 1e9;
        slow.request(t as u64, 1500, 0);
    }
    let x = slow.features(t as u64, 0, &Default::default(), &Default::default());
    assert!(sched(&x) < 0.05, "slow and low: scheduled_bursts {}", sched(&x));
}

#[test]
fn scheduled_bursts_discount_synchrony_but_keep_the_source_evidence() {
    // The same templated bursts, once as a fresh source and once as a persistent scheduled one: coactivity and
    // the cluster inheritance shrink, the source's own size and timing evidence does not.
    let fp = features::GroupView {
        score: 0.99,
        top: (size_bucket(1500) as u8, size_bucket(1500) as u8),
        sources: 40.0,
    };
    let mut ci = SourceState::new(S, 1);
    let mut t = S;
    for _ in 0..3 {
        for i in 0..30u64 {
            ci.request(t + i * S, 1500, 0);
            ci.coact_sample(3.0);
        }
        t += 300 * S;
    }
    let now = t - 300 * S + 29 * S;
    let x = ci.features(now, 0, &fp, &Default::default());
    assert!(feature("scheduled_bursts", &x) > 0.9);
    assert!(
        feature("coactivity", &x) < 0.3,
        "coactivity {}",
        feature("coactivity", &x)
    );
    assert!(
        feature("fp_cluster", &x) < 0.1,
        "fp_cluster {}",
        feature("fp_cluster", &x)
    );
    assert!(feature("template_match", &x) > 0.9);
    assert!(feature("size_repetition", &x) > 0.9);
}

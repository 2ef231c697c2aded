//! Training: fits the three logistic regressions (fingerprint cluster, prefix, source) on labelled *training*
//! scenarios and calibrates the policy thresholds on the same scenarios (never on `scenarios/eval/`).
//!
//! The solver is a hand-written Newton/IRLS with an L2 penalty (~60 lines). `linfa-logistic` builds here, but
//! pulls ndarray, argmin and linfa's core into the crate for an 11-weight model; the daemon only needs the
//! resulting weights, which ship as `model/weights.toml`, so the dependency would buy nothing at run time.
//!
//! Order: groups first (a source's `fp_cluster`/`prefix_cluster` features are its groups' scores), then sources
//! with the new group weights, then thresholds with everything in place.

use std::collections::HashMap;
use std::fmt::Write;

use super::eval::{self, Label, Probe, Scenario, Truth};
use super::features::{GROUP_FEATURES, NG, NS, SOURCE_FEATURES, SUSTAINED_TEMPLATED};
use super::score::{Compiled, LinearSpec, sigmoid, top_reasons};
use super::{Model, WeightsFile};

/// One labelled feature vector.
#[derive(Clone, Debug)]
pub struct Sample {
    pub x: Vec<f64>,
    pub y: f64,
}

/// Fits σ(b + w·x) by Newton's method with L2 penalty `l2` on w; classes are re-weighted to equal total weight.
#[expect(
    clippy::needless_range_loop,
    reason = "matrix code reads clearer with indices"
)]
pub fn fit(samples: &[Sample], n: usize, l2: f64) -> (f64, Vec<f64>) {
    let d = n + 1;
    let pos = samples.iter().filter(|s| s.y > 0.5).count().max(1) as f64;
    let neg = (samples.len() as f64 - pos).max(1.0);
    let wpos = samples.len() as f64 / (2.0 * pos);
    let wneg = samples.len() as f64 / (2.0 * neg);
    let mut beta = vec![0.0f64; d];
    for _ in 0..30 {
        let mut h = vec![vec![0.0f64; d]; d];
        let mut g = vec![0.0f64; d];
        for s in samples {
            let cw = if s.y > 0.5 { wpos } else { wneg };
            let mut z = beta[0];
            for j in 0..n {
                z += beta[j + 1] * s.x[j];
            }
            let p = 1.0 / (1.0 + (-z).exp());
            let r = cw * (s.y - p);
            let wt = cw * (p * (1.0 - p)).max(1e-9);
            let xi = |j: usize| if j == 0 { 1.0 } else { s.x[j - 1] };
            for a in 0..d {
                g[a] += r * xi(a);
                let xa = xi(a) * wt;
                for b in a..d {
                    h[a][b] += xa * xi(b);
                }
            }
        }
        for a in 0..d {
            for b in 0..a {
                h[a][b] = h[b][a];
            }
        }
        for a in 1..d {
            h[a][a] += l2 * samples.len() as f64;
            g[a] -= l2 * samples.len() as f64 * beta[a];
        }
        let step = solve(h, g);
        let mut max = 0.0f64;
        for a in 0..d {
            beta[a] += step[a];
            max = max.max(step[a].abs());
        }
        if max < 1e-6 {
            break;
        }
    }
    (beta[0], beta[1..].to_vec())
}

/// Gaussian elimination with partial pivoting.
#[expect(
    clippy::needless_range_loop,
    reason = "matrix code reads clearer with indices"
)]
fn solve(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Vec<f64> {
    let n = b.len();
    for c in 0..n {
        let p = (c..n)
            .max_by(|&i, &j| a[i][c].abs().total_cmp(&a[j][c].abs()))
            .unwrap_or(c);
        a.swap(c, p);
        b.swap(c, p);
        let piv = if a[c][c].abs() < 1e-12 { 1e-12 } else { a[c][c] };
        for r in (c + 1)..n {
            let f = a[r][c] / piv;
            if f != 0.0 {
                for k in c..n {
                    a[r][k] -= f * a[c][k];
                }
                b[r] -= f * b[c];
            }
        }
    }
    let mut x = vec![0.0; n];
    for c in (0..n).rev() {
        let mut s = b[c];
        for k in (c + 1)..n {
            s -= a[c][k] * x[k];
        }
        let piv = if a[c][c].abs() < 1e-12 { 1e-12 } else { a[c][c] };
        x[c] = s / piv;
    }
    x
}

fn spec(bias: f64, w: &[f64], names: &[&str]) -> LinearSpec {
    LinearSpec {
        bias: round3(bias),
        weights: names
            .iter()
            .zip(w)
            .map(|(n, &v)| (n.to_string(), round3(v)))
            .collect(),
    }
}

fn round3(v: f64) -> f32 {
    ((v * 1000.0).round() / 1000.0) as f32
}

#[derive(Default)]
struct Collected {
    src: Vec<Sample>,
    fp: Vec<Sample>,
    px: Vec<Sample>,
}

fn collect(scenarios: &[Scenario], weights: &WeightsFile, every_s: f64, cap: usize) -> Collected {
    let mut c = Collected::default();
    for sc in scenarios {
        let mut f = |m: &Model, now: u64, truth: &Truth| {
            let snap = m.snapshot(now);
            for (a, x) in snap.sources {
                if let Some(l) = truth.source.get(&a) {
                    c.src.push(Sample {
                        x: x.iter().map(|&v| v as f64).collect(),
                        y: (*l == Label::Campaign) as u8 as f64,
                    });
                }
            }
            for (k, x, active) in snap.fingerprints {
                if let (Some(&share), true) = (truth.fingerprint.get(&k), active >= 2.0) {
                    c.fp.push(Sample {
                        x: x.iter().map(|&v| v as f64).collect(),
                        y: (share >= 0.5) as u8 as f64,
                    });
                }
            }
            for (k, x, active) in snap.prefixes {
                if let (Some(&share), true) = (truth.prefix.get(&k), active >= 2.0) {
                    c.px.push(Sample {
                        x: x.iter().map(|&v| v as f64).collect(),
                        y: (share >= 0.5) as u8 as f64,
                    });
                }
            }
        };
        eval::run(sc, weights, Some(Probe { every_s, f: &mut f }));
    }
    for v in [&mut c.src, &mut c.fp, &mut c.px] {
        thin(v, cap);
    }
    c
}

/// Keeps at most `cap` samples (a deterministic stride).
fn thin(v: &mut Vec<Sample>, cap: usize) {
    if v.len() > cap {
        let stride = v.len() as f64 / cap as f64;
        let kept: Vec<Sample> = (0..cap)
            .map(|i| v[(i as f64 * stride) as usize].clone())
            .collect();
        *v = kept;
    }
}

/// Log-odds between the calibration anchor and the throttle threshold.
const MARGIN: f32 = 0.5;

fn round6(v: f32) -> f32 {
    ((v as f64 * 1e6).round() / 1e6) as f32
}

fn logit(p: f32) -> f32 {
    (p / (1.0 - p)).ln()
}

/// Trains on `scenarios` starting from `base` (used for the first collection pass); returns the new weights
/// file and a human summary. `fp_budget`: the share of benign training entities allowed above the throttle
/// threshold's anchor (0 = the highest benign score anchors it).
pub fn train(scenarios: &[Scenario], base: &WeightsFile, l2: f64, fp_budget: f64) -> (WeightsFile, String) {
    let mut log = String::new();
    let names_g: Vec<&str> = GROUP_FEATURES.to_vec();
    let names_s: Vec<&str> = SOURCE_FEATURES.to_vec();

    // 1. Groups.
    let c = collect(scenarios, base, 5.0, 200_000);
    let (bf, wf) = fit(&c.fp, NG, l2);
    let (bp, wp) = fit(&c.px, NG, l2);
    let _ = writeln!(
        log,
        "fingerprint samples {} ({} campaign)",
        c.fp.len(),
        c.fp.iter().filter(|s| s.y > 0.5).count()
    );
    let _ = writeln!(
        log,
        "prefix samples {} ({} campaign)",
        c.px.len(),
        c.px.iter().filter(|s| s.y > 0.5).count()
    );
    let mut w = base.clone();
    w.fingerprint = spec(bf, &wf, &names_g);
    w.prefix = spec(bp, &wp, &names_g);

    // 2. Sources, with the new group scores feeding fp_cluster / prefix_cluster.
    let c = collect(scenarios, &w, 5.0, 300_000);
    let (bs, ws) = fit(&c.src, NS, l2);
    let _ = writeln!(
        log,
        "source samples {} ({} campaign)",
        c.src.len(),
        c.src.iter().filter(|s| s.y > 0.5).count()
    );
    w.source = spec(bs, &ws, &names_s);

    // 3. Thresholds: each benign training entity's highest score at any tick; the throttle threshold sits a margin
    //    above all but the top `fp_budget` share of them.
    let compiled: Compiled = w.compile().expect("trained weights compile");
    let mut benign: HashMap<String, (f32, String)> = HashMap::new();
    let mut campaign_max: HashMap<String, f32> = HashMap::new();
    // The single-source tool rule's bound: above every benign source's sustained_templated at every tick.
    let mut tool_benign: (f32, String) = (0.0, String::new());
    let mut tool_campaign: HashMap<String, f32> = HashMap::new();
    for sc in scenarios {
        let mut f = |m: &Model, now: u64, truth: &Truth| {
            let snap = m.snapshot(now);
            let mut see = |id: String, z: f32, benign_entity: bool, why: &dyn Fn() -> String| {
                if benign_entity {
                    let e = benign.entry(id).or_insert((f32::NEG_INFINITY, String::new()));
                    if z > e.0 {
                        *e = (z, why());
                    }
                } else {
                    let e = campaign_max.entry(id).or_insert(f32::NEG_INFINITY);
                    *e = e.max(z);
                }
            };
            for (a, x) in snap.sources {
                let x: [f32; NS] = x.as_slice().try_into().expect("NS features");
                let z = compiled.source.logit(&x);
                if let Some(l) = truth.source.get(&a) {
                    let st = x[SUSTAINED_TEMPLATED];
                    if *l == Label::Benign {
                        if st > tool_benign.0 {
                            tool_benign = (st, format!("{}: source {a}", sc.name));
                        }
                    } else {
                        let e = tool_campaign.entry(format!("{}: {a}", sc.name)).or_insert(0.0);
                        *e = e.max(st);
                    }
                    let why = || top_reasons(&compiled.source, &x, &SOURCE_FEATURES, 4);
                    see(format!("{}: source {a}", sc.name), z, *l == Label::Benign, &why);
                }
            }
            for (k, x, active) in snap.fingerprints {
                let x: [f32; NG] = x.as_slice().try_into().expect("NG features");
                if active >= 2.0 && truth.fingerprint.get(&k).is_some_and(|&s| s < 0.5) {
                    let why = || top_reasons(&compiled.fingerprint, &x, &GROUP_FEATURES, 4);
                    see(
                        format!("{}: fingerprint {k:x}", sc.name),
                        compiled.fingerprint.logit(&x),
                        true,
                        &why,
                    );
                }
            }
            for (k, x, active) in snap.prefixes {
                let x: [f32; NG] = x.as_slice().try_into().expect("NG features");
                if active >= 2.0 && truth.prefix.get(&k).is_some_and(|&s| s < 0.5) {
                    let why = || top_reasons(&compiled.prefix, &x, &GROUP_FEATURES, 4);
                    see(
                        format!("{}: prefix {k}", sc.name),
                        compiled.prefix.logit(&x),
                        true,
                        &why,
                    );
                }
            }
        };
        eval::run(
            sc,
            &w,
            Some(Probe {
                every_s: 1.0,
                f: &mut f,
            }),
        );
    }
    let mut ranked: Vec<(f32, String, String)> =
        benign.into_iter().map(|(id, (z, why))| (z, id, why)).collect();
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
    let _ = writeln!(
        log,
        "highest-scoring benign training entities (max logit over all ticks):"
    );
    for (z, id, why) in ranked.iter().take(8) {
        let _ = writeln!(log, "  {z:6.2}  {id}: {why}");
    }
    let skip = ((ranked.len() as f64) * fp_budget).floor() as usize;
    let anchor = ranked.get(skip).map_or(0.0, |r| r.0);
    let throttle = (anchor + MARGIN).max(logit(0.8));
    let p = &mut w.policy;
    p.throttle_enter = round6(sigmoid(throttle));
    p.throttle_leave = round6(sigmoid(throttle - 0.7));
    p.monitor_enter = round6(sigmoid(throttle - 1.5));
    p.monitor_leave = round6(sigmoid(throttle - 2.2));
    p.block_enter = round6(sigmoid(throttle + 1.5));
    p.block_leave = round6(sigmoid(throttle + 0.8));
    let bound = (tool_benign.0 * 1.25).max(tool_benign.0 + 0.2);
    p.tool_sustained_templated = round6(bound);
    let _ = writeln!(
        log,
        "single-source tool rule: highest benign sustained_templated {:.3} ({}) → bound {bound:.3}; training \
         campaign sources above it at some tick: {}",
        tool_benign.0,
        tool_benign.1,
        tool_campaign.values().filter(|&&v| v >= bound).count()
    );
    let recall =
        campaign_max.values().filter(|&&z| z >= throttle).count() as f64 / campaign_max.len().max(1) as f64;
    let _ = writeln!(
        log,
        "{} benign entities; anchor logit {anchor:.2} (skipping the top {skip}) + margin {MARGIN} → throttle logit \
         {throttle:.2} (p {:.6}), block logit {:.2}; training campaign sources above the throttle threshold at some \
         tick: {:.1}%",
        ranked.len(),
        p.throttle_enter,
        throttle + 1.5,
        recall * 100.0
    );
    w.note = format!(
        "trained by `cargo xtask eval --train` on {} training scenarios (Newton/IRLS logistic regression, L2 {l2}); \
         thresholds calibrated on the same scenarios",
        scenarios.len()
    );
    (w, log)
}

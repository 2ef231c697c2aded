//! Scenario families with randomized parameters (`cargo xtask eval --families N --seed S`): scenario `i` of a
//! draw pairs campaign family `i mod 9` with honest family `i mod 6` and one more honest family picked at random,
//! every parameter drawn from the ranges of [`CAMPAIGN_FAMILIES`] / [`HONEST_FAMILIES`] (the same table is in
//! `docs/model.md`). Deterministic for a seed; evaluation and training draw from disjoint seed streams
//! ([`Purpose`]), so training never sees an evaluation scenario.

use super::Rng;
use super::scenario::{
    Adapt, Family, Label, Population, RateClassSpec, Reaction, Scenario, Secs, Sizes, Timing,
};

/// What a draw is for: the seed streams of the two never meet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    Eval,
    Train,
}

impl Purpose {
    fn domain(self) -> u64 {
        match self {
            Purpose::Eval => 0x6576_616c_0000_0000,
            Purpose::Train => 0x7472_6169_6e00_0000,
        }
    }
}

/// A family: its name (the row of the per-family table) and the parameter ranges it draws from.
pub struct FamilySpec {
    pub name: &'static str,
    pub ranges: &'static str,
}

/// Campaign families, in the order scenario `i` uses them (`i mod 9`).
pub const CAMPAIGN_FAMILIES: [FamilySpec; 9] = [
    FamilySpec {
        name: "lockstep-hydra",
        ranges: "100–400 sources over sources/1–4 /24s, one made-up client; lockstep rounds 0.05–0.3/s, jitter \
                 0.2–2 s, participation 0.5–1; 2–5 templated sizes 600–4000 B ± 1–6%",
    },
    FamilySpec {
        name: "periodic-hydra",
        ranges: "300–1500 sources over sources/2–8 /24s, one made-up client; each periodic with its own phase, \
                 0.02–0.2 req/s, jitter 2–20%; templated sizes",
    },
    FamilySpec {
        name: "per-source-fp",
        ranges: "100–400 sources over sources/1–3 /24s, a fresh JA4 per source, one SYN signature; lockstep \
                 rounds 0.05–0.25/s, jitter 0.3–2 s; templated sizes",
    },
    FamilySpec {
        name: "mimicry",
        ranges: "100–400 sources over sources/1–2 /24s in the openai-python fingerprint beside 150–400 honest \
                 users of it; Poisson or periodic 0.05–0.3 req/s; templated sizes",
    },
    FamilySpec {
        name: "slow-and-low",
        ranges: "200–800 sources, one per /24, one made-up client; Poisson 0.01–0.04 req/s; templated sizes",
    },
    FamilySpec {
        name: "release-surge",
        ranges: "release at 5–15 min; 100–300 sources over sources/2–6 /24s from 0–60 s after it, one made-up \
                 client; Poisson 0.2–1 req/s; templated sizes",
    },
    FamilySpec {
        name: "heavy-extractor",
        ranges: "1–3 sources, one made-up client; periodic 2–8 req/s, jitter 2–15%, 2–8 connections; templated \
                 sizes",
    },
    FamilySpec {
        name: "ipv6-rotation",
        ranges: "IPv6: 100–400 sources over 4–32 /64s of one /48, one made-up client; lockstep 0.05–0.25/s or \
                 periodic 0.05–0.2 req/s; on block rotate to a pool of 1–3× sources over 4–64 other /64s of the \
                 same /48; templated sizes",
    },
    FamilySpec {
        name: "adaptive",
        ranges: "100–400 sources over sources/1–4 /24s, lockstep or periodic as above; adapt: on block rotate \
                 (pool 1–3× sources over pool/1–4 fresh /24s, half of them also a fresh JA4), on throttle slow \
                 (×0.3–0.7) or rotate, notice after 2–5 failures, a fresh JA4 every 5–15 min (half), pause 2–5 \
                 min every 10–20 min (a third)",
    },
];

/// Honest families: scenario `i` has `i mod 6` and one more.
pub const HONEST_FAMILIES: [FamilySpec; 6] = [
    FamilySpec {
        name: "heavy-sdk",
        ranges: "2–8 sources, own or go-http fingerprint; Poisson 0.5–3 req/s, 1–4 connections; log-normal \
                 sizes median 800–3000 B, σ 0.8–1.4",
    },
    FamilySpec {
        name: "ci-bursts",
        ranges: "8–40 runners over 1–4 /24s, openai-python or their own CI client; synchronized bursts of 20–60 \
                 requests 0.3–1.5 s apart every 3–10 min, spread 5–30 s; 3–5 templated sizes ± 2%",
    },
    FamilySpec {
        name: "cgnat-office",
        ranges: "100–600 people (browsers) behind 2–10 addresses in 1–2 /24s; human timing (think 5–30 s, \
                 sessions of 5–20, idle 2–10 min); log-normal sizes",
    },
    FamilySpec {
        name: "browsers",
        ranges: "200–600 browsers (chrome, firefox or safari), one address each; human timing; log-normal sizes",
    },
    FamilySpec {
        name: "launch-day",
        ranges: "50–200 new SDK users (node-undici or openai-python) from 0–120 s after a release (5–15 min); \
                 Poisson 0.1–0.5 req/s; log-normal sizes",
    },
    FamilySpec {
        name: "diurnal-batch",
        ranges: "3–20 batch jobs, own fingerprints; diurnal 0.2–1 req/s at the peak (peak hour 0–24, trough \
                 0.05–0.3); log-normal sizes σ 0.3–0.8",
    },
];

/// Draws `n` scenarios for `purpose` from master seed `seed`.
pub fn draw(n: usize, seed: u64, purpose: Purpose) -> Vec<Scenario> {
    (0..n)
        .map(|i| draw_one(i, scenario_seed(seed, i, purpose)))
        .collect()
}

/// The seed of scenario `i` of a draw (SplitMix over the purpose's domain, the master seed and `i`).
pub fn scenario_seed(seed: u64, i: usize, purpose: Purpose) -> u64 {
    let mut r = Rng::new(purpose.domain() ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    for _ in 0..=i % 7 {
        r.next_u64();
    }
    r.next_u64() ^ (i as u64).wrapping_mul(0xd6e8_feb8_6659_fd93)
}

fn uni(r: &mut Rng, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * r.f64()
}

fn int(r: &mut Rng, lo: u32, hi: u32) -> u32 {
    lo + r.below((hi - lo + 1) as u64) as u32
}

fn templated(r: &mut Rng) -> Sizes {
    let k = int(r, 2, 5);
    Sizes::Templated {
        values: (0..k).map(|_| int(r, 600, 4000)).collect(),
        jitter: uni(r, 0.01, 0.06),
    }
}

fn lognormal(r: &mut Rng, lo: f64, hi: f64) -> Sizes {
    Sizes::LogNormal {
        median: uni(r, 600.0, 2500.0),
        sigma: uni(r, lo, hi),
    }
}

fn base(name: &str, family: &str, label: Label, sources: u32, fingerprint: &str) -> Population {
    Population {
        name: name.to_string(),
        label,
        sources,
        prefixes: None,
        family: Family::V4,
        fingerprint: fingerprint.to_string(),
        syn: None,
        rate: 1.0,
        timing: Timing::Poisson,
        sizes: Sizes::LogNormal {
            median: 1200.0,
            sigma: 1.0,
        },
        concurrency: 1,
        requests_per_conn: 100,
        start: Secs(0.0),
        end: None,
        at_release: false,
        addresses: None,
        eval_family: Some(family.to_string()),
        adapt: None,
    }
}

/// `sources / k` prefixes, at least 1 and with at most 254 addresses per /24.
fn spread(sources: u32, k: u32) -> Option<u32> {
    Some((sources / k.max(1)).max(sources.div_ceil(254)).clamp(1, sources))
}

fn lockstep(r: &mut Rng) -> (f64, Timing) {
    (
        uni(r, 0.05, 0.3),
        Timing::Lockstep {
            jitter: Secs(uni(r, 0.2, 2.0)),
            participation: uni(r, 0.5, 1.0),
        },
    )
}

fn periodic(r: &mut Rng, lo: f64, hi: f64) -> (f64, Timing) {
    (
        uni(r, lo, hi),
        Timing::Periodic {
            jitter: uni(r, 0.02, 0.2),
        },
    )
}

fn human(r: &mut Rng) -> Timing {
    Timing::Human {
        think: Secs(uni(r, 5.0, 30.0)),
        session: int(r, 5, 20),
        idle: Secs(uni(r, 120.0, 600.0)),
    }
}

fn campaign(r: &mut Rng, f: usize, i: usize, sc: &mut Scenario) {
    let fam = CAMPAIGN_FAMILIES[f].name;
    let client = format!("{fam}-client-{i}");
    let start = Secs(uni(r, 120.0, 900.0).min(sc.duration.0 * 0.4));
    let mut p = base(fam, fam, Label::Campaign, 1, &client);
    p.start = start;
    p.sizes = templated(r);
    match fam {
        "lockstep-hydra" => {
            p.sources = int(r, 100, 400);
            p.prefixes = spread(p.sources, int(r, 1, 4));
            (p.rate, p.timing) = lockstep(r);
        }
        "periodic-hydra" => {
            p.sources = int(r, 300, 1500);
            p.prefixes = spread(p.sources, int(r, 2, 8));
            (p.rate, p.timing) = periodic(r, 0.02, 0.2);
        }
        "per-source-fp" => {
            p.sources = int(r, 100, 400);
            p.prefixes = spread(p.sources, int(r, 1, 3));
            p.fingerprint = "unique".into();
            p.syn = Some(client);
            p.rate = uni(r, 0.05, 0.25);
            p.timing = Timing::Lockstep {
                jitter: Secs(uni(r, 0.3, 2.0)),
                participation: uni(r, 0.5, 1.0),
            };
        }
        "mimicry" => {
            p.sources = int(r, 100, 400);
            p.prefixes = spread(p.sources, int(r, 1, 2));
            p.fingerprint = "openai-python".into();
            (p.rate, p.timing) = if r.f64() < 0.5 {
                (uni(r, 0.05, 0.3), Timing::Poisson)
            } else {
                periodic(r, 0.05, 0.3)
            };
            let mut h = base(
                "mimicked-sdk-users",
                "sdk-users-beside-mimicry",
                Label::Benign,
                1,
                "openai-python",
            );
            h.sources = int(r, 150, 400);
            h.rate = uni(r, 0.05, 0.3);
            h.sizes = lognormal(r, 0.8, 1.3);
            sc.populations.push(h);
        }
        "slow-and-low" => {
            p.sources = int(r, 200, 800);
            p.rate = uni(r, 0.01, 0.04);
        }
        "release-surge" => {
            sc.release_at.get_or_insert(Secs(uni(r, 300.0, 900.0)));
            p.sources = int(r, 100, 300);
            p.prefixes = spread(p.sources, int(r, 2, 6));
            p.at_release = true;
            p.start = Secs(uni(r, 0.0, 60.0));
            p.rate = uni(r, 0.2, 1.0);
        }
        "heavy-extractor" => {
            p.sources = int(r, 1, 3);
            p.rate = uni(r, 2.0, 8.0);
            p.timing = Timing::Periodic {
                jitter: uni(r, 0.02, 0.15),
            };
            p.concurrency = int(r, 2, 8);
        }
        "ipv6-rotation" => {
            p.family = Family::V6;
            p.sources = int(r, 100, 400);
            p.prefixes = Some(int(r, 4, 32).min(p.sources));
            (p.rate, p.timing) = if r.f64() < 0.5 {
                let (_, t) = lockstep(r);
                (uni(r, 0.05, 0.25), t)
            } else {
                periodic(r, 0.05, 0.2)
            };
            let pool = p.sources * int(r, 1, 3);
            p.adapt = Some(Adapt {
                notice_after: 3,
                on_block: Reaction::Rotate,
                on_throttle: Reaction::None,
                pool,
                pool_prefixes: Some(int(r, 4, 64).min(pool)),
                rotate_fingerprint: false,
                slow_factor: 0.5,
                fingerprint_every: None,
                pause_every: None,
                pause_for: Secs(300.0),
            });
        }
        _ => {
            // adaptive
            p.sources = int(r, 100, 400);
            p.prefixes = spread(p.sources, int(r, 1, 4));
            (p.rate, p.timing) = if r.f64() < 0.5 {
                lockstep(r)
            } else {
                periodic(r, 0.05, 0.2)
            };
            let pool = p.sources * int(r, 1, 3);
            let pause_for = Secs(uni(r, 120.0, 300.0));
            p.adapt = Some(Adapt {
                notice_after: int(r, 2, 5),
                on_block: Reaction::Rotate,
                on_throttle: if r.f64() < 0.5 {
                    Reaction::Slow
                } else {
                    Reaction::Rotate
                },
                pool,
                pool_prefixes: spread(pool, int(r, 1, 4)),
                rotate_fingerprint: r.f64() < 0.5,
                slow_factor: uni(r, 0.3, 0.7),
                fingerprint_every: (r.f64() < 0.5).then(|| Secs(uni(r, 300.0, 900.0))),
                pause_every: (r.f64() < 1.0 / 3.0).then(|| Secs(uni(r, 600.0, 1200.0))),
                pause_for,
            });
        }
    }
    sc.populations.push(p);
}

fn honest(r: &mut Rng, f: usize, i: usize, sc: &mut Scenario) {
    let fam = HONEST_FAMILIES[f].name;
    let mut p = base(fam, fam, Label::Benign, 1, "chrome");
    match fam {
        "heavy-sdk" => {
            p.sources = int(r, 2, 8);
            p.fingerprint = if r.f64() < 0.5 { "unique" } else { "go-http" }.into();
            p.rate = uni(r, 0.5, 3.0);
            p.concurrency = int(r, 1, 4);
            p.sizes = Sizes::LogNormal {
                median: uni(r, 800.0, 3000.0),
                sigma: uni(r, 0.8, 1.4),
            };
        }
        "ci-bursts" => {
            p.sources = int(r, 8, 40);
            p.prefixes = Some(int(r, 1, 4).min(p.sources));
            p.fingerprint = if r.f64() < 0.5 {
                "openai-python".into()
            } else {
                format!("ci-client-{i}")
            };
            let burst = int(r, 20, 60);
            let every = uni(r, 180.0, 600.0);
            p.rate = burst as f64 / every;
            p.timing = Timing::Bursty {
                burst,
                gap: Secs(uni(r, 0.3, 1.5)),
                synchronized: true,
                spread: Secs(uni(r, 5.0, 30.0)),
            };
            let k = int(r, 3, 5);
            p.sizes = Sizes::Templated {
                values: (0..k).map(|_| int(r, 600, 5000)).collect(),
                jitter: 0.02,
            };
            p.concurrency = int(r, 1, 2);
        }
        "cgnat-office" => {
            p.sources = int(r, 100, 600);
            p.addresses = Some(int(r, 2, 10));
            p.prefixes = Some(int(r, 1, 2).min(p.addresses.unwrap_or(1)));
            p.fingerprint = ["chrome", "firefox", "safari"][r.below(3) as usize].into();
            p.timing = human(r);
            p.sizes = lognormal(r, 1.0, 1.3);
            p.concurrency = 2;
        }
        "browsers" => {
            p.sources = int(r, 200, 600);
            p.fingerprint = ["chrome", "firefox", "safari"][r.below(3) as usize].into();
            p.timing = human(r);
            p.sizes = lognormal(r, 1.0, 1.3);
        }
        "launch-day" => {
            sc.release_at.get_or_insert(Secs(uni(r, 300.0, 900.0)));
            p.sources = int(r, 50, 200);
            p.fingerprint = if r.f64() < 0.5 {
                "node-undici"
            } else {
                "openai-python"
            }
            .into();
            p.at_release = true;
            p.start = Secs(uni(r, 0.0, 120.0));
            p.rate = uni(r, 0.1, 0.5);
            p.sizes = lognormal(r, 0.9, 1.3);
        }
        _ => {
            // diurnal-batch
            p.sources = int(r, 3, 20);
            p.fingerprint = "unique".into();
            p.rate = uni(r, 0.2, 1.0);
            p.timing = Timing::Diurnal {
                peak_hour: uni(r, 0.0, 24.0),
                trough: uni(r, 0.05, 0.3),
            };
            p.sizes = lognormal(r, 0.3, 0.8);
        }
    }
    p.name = format!("{fam}-{}", sc.populations.len());
    sc.populations.push(p);
}

fn draw_one(i: usize, seed: u64) -> Scenario {
    let mut r = Rng::new(seed);
    let cf = i % CAMPAIGN_FAMILIES.len();
    let hf = i % HONEST_FAMILIES.len();
    let mut other = r.below(HONEST_FAMILIES.len() as u64 - 1) as usize;
    if other >= hf {
        other += 1;
    }
    let mut sc = Scenario {
        name: format!("f{i:03}-{}", CAMPAIGN_FAMILIES[cf].name),
        description: format!(
            "drawn: {} beside {} and {}",
            CAMPAIGN_FAMILIES[cf].name, HONEST_FAMILIES[hf].name, HONEST_FAMILIES[other].name
        ),
        duration: Secs(uni(&mut r, 1200.0, 2700.0).round()),
        seed,
        start_hour: uni(&mut r, 0.0, 24.0),
        release_at: None,
        rate_class: RateClassSpec::default(),
        populations: Vec::new(),
    };
    campaign(&mut r, cf, i, &mut sc);
    honest(&mut r, hf, i, &mut sc);
    honest(&mut r, other, i, &mut sc);
    sc
}

/// The family table as Markdown (what `docs/model.md` shows).
pub fn table_markdown() -> String {
    let mut o = String::from("| family | label | parameters |\n|---|---|---|\n");
    for (specs, label) in [
        (&CAMPAIGN_FAMILIES[..], "campaign"),
        (&HONEST_FAMILIES[..], "honest"),
    ] {
        for f in specs {
            o.push_str(&format!("| `{}` | {label} | {} |\n", f.name, f.ranges));
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_are_valid_deterministic_and_cover_every_family() {
        let a = draw(18, 1, Purpose::Eval);
        let b = draw(18, 1, Purpose::Eval);
        for (x, y) in a.iter().zip(&b) {
            x.validate(&x.name).expect("a drawn scenario is valid");
            assert_eq!(format!("{x:?}"), format!("{y:?}"));
        }
        for f in CAMPAIGN_FAMILIES.iter().chain(&HONEST_FAMILIES) {
            assert!(
                a.iter()
                    .flat_map(|s| &s.populations)
                    .any(|p| p.eval_family.as_deref() == Some(f.name)),
                "family {} drawn",
                f.name
            );
        }
        assert_ne!(
            format!("{:?}", draw(1, 2, Purpose::Eval)[0]),
            format!("{:?}", a[0])
        );
    }

    #[test]
    fn training_and_evaluation_draw_from_disjoint_seeds() {
        let eval: std::collections::HashSet<u64> = (0..4)
            .flat_map(|s| (0..500).map(move |i| scenario_seed(s, i, Purpose::Eval)))
            .collect();
        for s in 0..4 {
            for i in 0..500 {
                assert!(!eval.contains(&scenario_seed(s, i, Purpose::Train)));
            }
        }
    }
}

#[cfg(test)]
mod doc_tests {
    /// docs/model.md carries the family table exactly as the code defines it.
    #[test]
    fn the_documented_family_table_matches_the_code() {
        let doc = include_str!("../../../../docs/model.md");
        assert!(
            doc.contains(&super::table_markdown()),
            "docs/model.md must contain families::table_markdown():\n{}",
            super::table_markdown()
        );
    }
}

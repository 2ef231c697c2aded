//! The scenario file format (TOML; documented with examples in `docs/model.md`).

use std::path::Path;

use serde::{Deserialize, Deserializer};

/// Errors reading a scenario.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("cannot read scenario {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot parse scenario {path}")]
    Parse {
        path: String,
        #[source]
        source: toml::de::Error,
    },
    #[error("scenario {path}: population {population:?}: {problem}")]
    Invalid {
        path: String,
        population: String,
        problem: String,
    },
}

/// Seconds, written as `"90s"`, `"15m"`, `"2h"`, `"250ms"` or a bare number of seconds.
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd, Default)]
pub struct Secs(pub f64);

impl<'de> Deserialize<'de> for Secs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(f64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(Secs(n)),
            Raw::S(s) => parse_secs(&s).map(Secs).ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "invalid duration {s:?} (e.g. \"250ms\", \"90s\", \"15m\", \"2h\")"
                ))
            }),
        }
    }
}

pub fn parse_secs(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3600.0)
    } else if let Some(n) = s.strip_suffix('d') {
        (n, 86400.0)
    } else {
        (s, 1.0)
    };
    num.trim()
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v >= 0.0)
        .map(|v| v * mult)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Label {
    Benign,
    Campaign,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    #[default]
    V4,
    V6,
}

/// When a population's requests happen.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Timing {
    /// Independent exponential gaps at `rate`.
    Poisson,
    /// Gaps of 1/`rate` ± `jitter` (a fraction of the period); random phase per source.
    Periodic {
        #[serde(default = "d_jitter")]
        jitter: f64,
    },
    /// Bursts of `burst` requests `gap` apart; burst starts are Poisson so the mean rate is `rate`. With
    /// `synchronized`, all sources of the population start their bursts together (± `spread`), like CI runners
    /// triggered by one push.
    Bursty {
        burst: u32,
        gap: Secs,
        #[serde(default)]
        synchronized: bool,
        #[serde(default = "d_spread")]
        spread: Secs,
    },
    /// Poisson with the rate modulated over the day: full at `peak_hour`, `trough` × rate twelve hours away.
    Diurnal {
        #[serde(default = "d_peak")]
        peak_hour: f64,
        #[serde(default = "d_trough")]
        trough: f64,
    },
    /// People: sessions of about `session` requests with log-normal think times (median `think`), exponential
    /// idle time (mean `idle`) between sessions; `rate` is ignored.
    Human { think: Secs, session: u32, idle: Secs },
    /// An orchestrator: rounds at `rate` per second (± 10%), in each round every source fires with probability
    /// `participation`, within `jitter` of the round start.
    Lockstep {
        jitter: Secs,
        #[serde(default = "d_one")]
        participation: f64,
    },
}

fn d_jitter() -> f64 {
    0.05
}
fn d_spread() -> Secs {
    Secs(5.0)
}
fn d_peak() -> f64 {
    15.0
}
fn d_trough() -> f64 {
    0.1
}
fn d_one() -> f64 {
    1.0
}

/// Request sizes (client payload bytes per request).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Sizes {
    /// One of `values` (uniformly), each ± `jitter` (fraction).
    Templated {
        values: Vec<u32>,
        #[serde(default = "d_jitter")]
        jitter: f64,
    },
    LogNormal {
        median: f64,
        sigma: f64,
    },
    Uniform {
        min: u32,
        max: u32,
    },
}

/// One population of sources.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Population {
    pub name: String,
    pub label: Label,
    pub sources: u32,
    /// How many /24 (or /64) prefixes the sources spread over (round-robin); default: one per source.
    #[serde(default)]
    pub prefixes: Option<u32>,
    #[serde(default)]
    pub family: Family,
    /// `"unique"`: each source its own fingerprint; otherwise a client profile name shared by every source of
    /// every population naming it (`chrome`, `firefox`, `safari`, `openai-python`, `python-httpx`,
    /// `node-undici`, `go-http`, `curl`, or any other name for a made-up one).
    pub fingerprint: String,
    /// With `fingerprint = "unique"`: the client profile whose SYN signature every source keeps under its own
    /// JA4 (uTLS-like rotation: only the TLS layer varies). Default: a random SYN signature per source.
    #[serde(default)]
    pub syn: Option<String>,
    /// Mean requests per second per source (for `lockstep`: rounds per second).
    #[serde(default = "d_one")]
    pub rate: f64,
    pub timing: Timing,
    pub sizes: Sizes,
    /// Parallel connections per source.
    #[serde(default = "d_conc")]
    pub concurrency: u32,
    /// Requests per connection before it is closed and a new one opened.
    #[serde(default = "d_rpc")]
    pub requests_per_conn: u32,
    #[serde(default)]
    pub start: Secs,
    /// Default: the scenario's end.
    #[serde(default)]
    pub end: Option<Secs>,
    /// Start relative to the release instead of the scenario start.
    #[serde(default)]
    pub at_release: bool,
    /// Addresses the population's sources share (round-robin): fewer than `sources` puts several clients
    /// behind one address (carrier-grade NAT, an office). Default: one address per source.
    #[serde(default)]
    pub addresses: Option<u32>,
    /// The evaluation family the population belongs to, for the per-family table (default: its name).
    #[serde(default)]
    pub eval_family: Option<String>,
    /// How the population reacts to decisions (closed loop); default: it does not.
    #[serde(default)]
    pub adapt: Option<Adapt>,
}

/// What a source does once it notices a decision against it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reaction {
    /// Carry on.
    #[default]
    None,
    /// Move to the next fresh address of the population's pool (and, with `rotate_fingerprint`, a fresh JA4).
    Rotate,
    /// Multiply the source's request rate by `slow_factor`.
    Slow,
    /// Go quiet for `pause_for`, then resume.
    Pause,
}

/// A population's adaptation to decisions (the `adapt` table of a population).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Adapt {
    /// A source notices a decision after this many consecutive failed requests (blocked, refused, or delayed
    /// by more than a second).
    #[serde(default = "d_notice")]
    pub notice_after: u32,
    #[serde(default)]
    pub on_block: Reaction,
    #[serde(default)]
    pub on_throttle: Reaction,
    /// Fresh addresses the population can rotate to (shared by its sources, each used once).
    #[serde(default)]
    pub pool: u32,
    /// How many fresh prefixes (/24s; /64s inside the population's /48 for IPv6) the pool spreads over
    /// (default: one per pool address).
    #[serde(default)]
    pub pool_prefixes: Option<u32>,
    /// A rotation also draws a fresh TLS fingerprint (the SYN signature stays).
    #[serde(default)]
    pub rotate_fingerprint: bool,
    #[serde(default = "d_slow")]
    pub slow_factor: f64,
    /// Change fingerprint (a fresh JA4, same SYN signature) every this long, counted from the population start.
    #[serde(default)]
    pub fingerprint_every: Option<Secs>,
    /// Pause and resume: every `pause_every` (from the population start) the population goes quiet for
    /// `pause_for`; `pause_for` is also how long the `pause` reaction lasts.
    #[serde(default)]
    pub pause_every: Option<Secs>,
    #[serde(default = "d_pause")]
    pub pause_for: Secs,
}

fn d_notice() -> u32 {
    3
}
fn d_slow() -> f64 {
    0.5
}
fn d_pause() -> Secs {
    Secs(300.0)
}

/// What happens to traffic over the throttle rate class: dropped packets turn into a refused request, or into a
/// delay (TCP retransmits until the limiter lets the request through) and a refusal beyond `max_delay`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Over {
    Refuse,
    #[default]
    Delay,
}

/// The rate class a throttle decision holds a source to (the `rate_class` table of a scenario; defaults are the
/// shipped `throttle` class of `packaging/aqd.toml`). Limits are per source address, as in the kernel.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateClassSpec {
    pub packets_per_second: f64,
    pub packet_burst: f64,
    pub connections_per_second: f64,
    pub connection_burst: f64,
    pub over: Over,
    pub max_delay: Secs,
}

impl Default for RateClassSpec {
    fn default() -> Self {
        RateClassSpec {
            packets_per_second: 50.0,
            packet_burst: 100.0,
            connections_per_second: 5.0,
            connection_burst: 10.0,
            over: Over::Delay,
            max_delay: Secs(30.0),
        }
    }
}

fn d_conc() -> u32 {
    1
}
fn d_rpc() -> u32 {
    100
}

/// A scenario.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub duration: Secs,
    #[serde(default)]
    pub seed: u64,
    /// Wall-clock hour of day (UTC) at the scenario start.
    #[serde(default = "d_hour")]
    pub start_hour: f64,
    /// A model release, relative to the scenario start.
    #[serde(default)]
    pub release_at: Option<Secs>,
    /// The throttle rate class the closed loop enforces.
    #[serde(default)]
    pub rate_class: RateClassSpec,
    #[serde(rename = "population")]
    pub populations: Vec<Population>,
}

fn d_hour() -> f64 {
    9.0
}

impl Scenario {
    pub fn parse(text: &str, path: &str) -> Result<Self, ScenarioError> {
        let s: Scenario = toml::from_str(text).map_err(|source| ScenarioError::Parse {
            path: path.to_string(),
            source,
        })?;
        s.validate(path)?;
        Ok(s)
    }

    /// Checks what the types cannot (counts, ranges, references); `path` names the scenario in errors.
    pub fn validate(&self, path: &str) -> Result<(), ScenarioError> {
        let s = self;
        for p in &s.populations {
            let bad = |problem: &str| ScenarioError::Invalid {
                path: path.to_string(),
                population: p.name.clone(),
                problem: problem.to_string(),
            };
            if p.sources == 0 {
                return Err(bad("sources must be at least 1"));
            }
            if p.rate <= 0.0 || !p.rate.is_finite() {
                return Err(bad("rate must be positive"));
            }
            if p.concurrency == 0 || p.requests_per_conn == 0 {
                return Err(bad("concurrency and requests_per_conn must be at least 1"));
            }
            if p.at_release && s.release_at.is_none() {
                return Err(bad("at_release needs a scenario-level release_at"));
            }
            if let Sizes::Templated { values, .. } = &p.sizes
                && values.is_empty()
            {
                return Err(bad("a templated size distribution needs values"));
            }
            let addresses = p.addresses.unwrap_or(p.sources);
            if addresses == 0 || addresses > p.sources {
                return Err(bad("addresses must be between 1 and sources"));
            }
            if p.prefixes.is_some_and(|n| n == 0 || n > addresses) {
                return Err(bad("prefixes must be between 1 and the number of addresses"));
            }
            let np = p.prefixes.unwrap_or(addresses);
            if p.family == Family::V4 && addresses.div_ceil(np) > 254 {
                return Err(bad("more than 254 addresses per /24"));
            }
            if let Some(a) = &p.adapt {
                if p.family == Family::V4 && a.pool.div_ceil(a.pool_prefixes.unwrap_or(a.pool).max(1)) > 254 {
                    return Err(bad("adapt: more than 254 pool addresses per /24"));
                }
                if a.notice_after == 0 {
                    return Err(bad("adapt.notice_after must be at least 1"));
                }
                if !(a.slow_factor > 0.0 && a.slow_factor <= 1.0) {
                    return Err(bad("adapt.slow_factor must be in (0, 1]"));
                }
                if a.pool_prefixes.is_some_and(|n| n == 0 || n > a.pool.max(1)) {
                    return Err(bad("adapt.pool_prefixes must be between 1 and pool"));
                }
                if (a.on_block == Reaction::Rotate || a.on_throttle == Reaction::Rotate) && a.pool == 0 {
                    return Err(bad("the rotate reaction needs adapt.pool fresh addresses"));
                }
                if a.fingerprint_every.is_some_and(|e| e.0 < 1.0)
                    || a.pause_every.is_some_and(|e| e.0 <= a.pause_for.0)
                {
                    return Err(bad(
                        "adapt.fingerprint_every must be at least 1 s and adapt.pause_every longer than pause_for",
                    ));
                }
            }
        }
        let rc = &s.rate_class;
        if [
            rc.packets_per_second,
            rc.packet_burst,
            rc.connections_per_second,
            rc.connection_burst,
        ]
        .iter()
        .any(|v| !v.is_finite() || *v < 0.0)
        {
            return Err(ScenarioError::Invalid {
                path: path.to_string(),
                population: String::new(),
                problem: "rate_class limits must be finite and non-negative (0 = unlimited)".into(),
            });
        }
        Ok(())
    }

    pub fn load(path: &Path) -> Result<Self, ScenarioError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            path: p.clone(),
            source,
        })?;
        Self::parse(&text, &p)
    }

    /// (start, end) of a population in scenario seconds.
    pub fn window(&self, p: &Population) -> (f64, f64) {
        let base = if p.at_release {
            self.release_at.map_or(0.0, |r| r.0)
        } else {
            0.0
        };
        let start = base + p.start.0;
        let end = p.end.map_or(self.duration.0, |e| base + e.0).min(self.duration.0);
        (start, end)
    }
}

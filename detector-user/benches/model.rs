//! Behavioural-model benchmark (plain std timing, one core): observations scored per second and bytes per
//! tracked source at 1,000,000 sources. `cargo bench -p detector-user --bench model [-- --quick]`.
//!
//! Workload: 1,000,000 sources (IPv4, 256 per /24) spread over 20,000 fingerprints; first every source is
//! inserted (one request each), then requests (90%) and connection opens/closes (10%) hit random sources at a
//! simulated 1,000,000 observations/s, with `tick()` once per simulated second (its cost is included).

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use detector_user::model::{FingerprintId, FpKey, Model, ModelConfig, Observation};

const SOURCES: u32 = 1_000_000;

fn addr(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        10 + (i >> 24) as u8,
        (i >> 16) as u8,
        (i >> 8) as u8,
        i as u8,
    ))
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let events: u64 = if quick { 2_000_000 } else { 10_000_000 };
    let mut model = Model::new(ModelConfig {
        prealloc: true,
        max_sources: SOURCES as usize,
        ..ModelConfig::default()
    });
    let fps: Vec<FpKey> = (0..20_000u64)
        .map(|i| {
            model.intern(FingerprintId {
                ja4: Some(format!("t13d1516h2_bench_{i}").into()),
                syn_key: i,
            })
        })
        .collect();
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let t0_ns = 1_000_000_000_000u64;

    // Fill: one request per source.
    let start = Instant::now();
    for i in 0..SOURCES {
        let fp = fps[(i as usize * 7919) % fps.len()];
        model.observe(&Observation::Request {
            time_ns: t0_ns + i as u64 * 1_000,
            src: addr(i),
            flow: i as u64,
            fp,
            bytes: 200 + (rng.next() % 8000) as u32,
            packets: 2,
        });
    }
    let fill = start.elapsed();
    let mem_full = model.memory_report();

    // Steady state.
    let mut t = t0_ns + SOURCES as u64 * 1_000;
    let mut decisions = 0usize;
    let mut tick_time = std::time::Duration::ZERO;
    let mut by_scope = [0usize; 3];
    let mut example: Option<String> = None;
    let start = Instant::now();
    for n in 0..events {
        let r = rng.next();
        let i = (r % SOURCES as u64) as u32;
        let fp = fps[(i as usize * 7919) % fps.len()];
        t += 1_000; // 1,000,000 observations per simulated second
        let obs = match (r >> 40) % 20 {
            0 => Observation::ConnOpen {
                time_ns: t,
                src: addr(i),
                flow: r,
                fp,
            },
            1 => Observation::ConnClose {
                time_ns: t,
                src: addr(i),
                flow: r,
                fp,
                requests: 3,
                client_bytes: 6000,
                server_bytes_est: 40_000,
            },
            _ => Observation::Request {
                time_ns: t,
                src: addr(i),
                flow: r,
                fp,
                bytes: 200 + ((r >> 20) % 8000) as u32,
                packets: 2,
            },
        };
        model.observe(black_box(&obs));
        if n % 1_000_000 == 999_999 {
            let ts = Instant::now();
            let ds = model.tick(t, &());
            for d in &ds {
                match d.scope {
                    detector_user::model::Scope::Source(_) => by_scope[0] += 1,
                    detector_user::model::Scope::Prefix(_) => by_scope[1] += 1,
                    detector_user::model::Scope::Fingerprint(_) => by_scope[2] += 1,
                }
                if example.is_none() {
                    example = Some(format!("{} {}", d.scope, d.reason));
                }
            }
            decisions += ds.len();
            tick_time += ts.elapsed();
        }
    }
    let steady = start.elapsed();
    let mem = model.memory_report();

    // Hot set: the same traffic concentrated on 10,000 of the sources (cache-resident state).
    let hot_events = events / 2;
    let start = Instant::now();
    for _ in 0..hot_events {
        let r = rng.next();
        let i = ((r % 10_000) * 97) as u32;
        let fp = fps[(i as usize * 7919) % fps.len()];
        t += 1_000;
        let obs = Observation::Request {
            time_ns: t,
            src: addr(i),
            flow: r,
            fp,
            bytes: 200 + ((r >> 20) % 8000) as u32,
            packets: 2,
        };
        model.observe(black_box(&obs));
    }
    let hot = hot_events as f64 / start.elapsed().as_secs_f64();

    // Compute cost alone: a small model (2,000 sources, 20 fingerprints) whose tables stay in cache and TLB.
    let mut small = Model::new(ModelConfig::default());
    let sfps: Vec<FpKey> = (0..20u64)
        .map(|i| {
            small.intern(FingerprintId {
                ja4: None,
                syn_key: i + 1,
            })
        })
        .collect();
    let start = Instant::now();
    let mut ts = t0_ns;
    for n in 0..hot_events {
        let r = rng.next();
        let i = (r % 2_000) as u32;
        ts += 1_000;
        let obs = Observation::Request {
            time_ns: ts,
            src: addr(i),
            flow: r,
            fp: sfps[i as usize % sfps.len()],
            bytes: 200 + ((r >> 20) % 8000) as u32,
            packets: 2,
        };
        small.observe(black_box(&obs));
        if n % 1_000_000 == 999_999 {
            small.tick(ts, &());
        }
    }
    let compute = hot_events as f64 / start.elapsed().as_secs_f64();

    let rate = events as f64 / steady.as_secs_f64();
    println!(
        "behavioural model, one core ({} observations after a {}-source fill)",
        events, SOURCES
    );
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| fill: new sources/s | {:.0} |",
        SOURCES as f64 / fill.as_secs_f64()
    );
    println!("| observations/s scored (incl. ticks) | {rate:.0} |");
    println!("| ns per observation | {:.0} |", 1e9 / rate);
    println!("| observations/s, 10,000 hot sources of the 1,000,000 | {hot:.0} |");
    println!("| observations/s, small model (2,000 sources; compute only) | {compute:.0} |");
    println!(
        "| tick() at 1,000,000 sources | {:.1} ms each ({} ticks) |",
        tick_time.as_secs_f64() * 1e3 / (events / 1_000_000).max(1) as f64,
        events / 1_000_000
    );
    println!("| tracked sources | {} |", mem.sources);
    println!(
        "| bytes per source (index + state, reserved for 1,000,000) | {:.1} |",
        mem_full.bytes_per_source
    );
    println!(
        "| prefixes / fingerprints tracked | {} / {} |",
        mem.prefixes, mem.fingerprints
    );
    println!(
        "| model total | {:.1} MiB (sources {:.1}, prefixes {:.1}, fingerprints {:.1}, other {:.1}) |",
        mem.total_bytes as f64 / 1048576.0,
        mem.source_bytes as f64 / 1048576.0,
        mem.prefix_bytes as f64 / 1048576.0,
        mem.fingerprint_bytes as f64 / 1048576.0,
        mem.other_bytes as f64 / 1048576.0
    );
    println!(
        "| decisions proposed (random traffic) | {decisions} (sources {}, prefixes {}, fingerprints {}) |",
        by_scope[0], by_scope[1], by_scope[2]
    );
    if let Some(e) = example {
        println!("| first decision | {e} |");
    }
    println!(
        "targets: ≥ 1,000,000 observations/s: {}; ≤ 256 bytes per source: {}",
        if rate >= 1e6 { "met" } else { "NOT met" },
        if mem_full.bytes_per_source <= 256.0 {
            "met"
        } else {
            "NOT met"
        }
    );
}

//! `cargo xtask fuzz`: long runs of the `cargo fuzz` targets, and the fuzz runner that `cargo xtask test`'s
//! short fuzz step shares.
//!
//! Both build `fuzz/` with `cargo +nightly-2026-05-19 fuzz build --debug-assertions` (the pinned
//! `bootstrap::NIGHTLY_TOOLCHAIN`; AddressSanitizer, the default; overflow checks and debug assertions on, so
//! that an arithmetic overflow in a parser is a failure rather than a wrapped value) and run each target from
//! its checked-in seeds (`fuzz/seeds/TARGET`) with memory limits: any panic, sanitizer report, timeout,
//! allocation over [`FUZZ_MALLOC_LIMIT_MB`] or RSS over [`FUZZ_RSS_LIMIT_MB`] fails the target, and libFuzzer
//! leaves the input in `fuzz/artifacts/TARGET/`. Every target runs even when one fails; the failures are
//! reported together at the end.
//!
//! The short step of `cargo xtask test` starts from a fresh scratch corpus each time; `cargo xtask fuzz` keeps
//! what it finds in the gitignored `fuzz/corpus/TARGET/`, so that successive long runs go on from there.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};
use clap::Args;

use crate::{bootstrap, util};

/// The fuzz targets in `fuzz/fuzz_targets/`, one per userspace parser (see the README's "Fuzzing" section).
pub const FUZZ_TARGETS: [&str; 11] = [
    "client_hello",
    "event_decode",
    "control_request",
    "config_toml",
    "list_file",
    "capture",
    "p0f_db",
    "syn",
    "hello_key",
    "lockout",
    "store",
];
/// libFuzzer's `-malloc_limit_mb`: the largest single allocation a target may make. The code under test
/// never needs more than a few times its 16 KiB reassembly bound or its input.
pub const FUZZ_MALLOC_LIMIT_MB: u32 = 64;
/// libFuzzer's `-rss_limit_mb` (its default, made explicit): ASan's quarantine alone keeps a few hundred MB.
pub const FUZZ_RSS_LIMIT_MB: u32 = 2048;
/// libFuzzer's `-timeout`: one input taking longer than this is a failure (a hang).
const FUZZ_INPUT_TIMEOUT_S: u32 = 10;

#[derive(Args)]
pub struct FuzzArgs {
    /// Seconds per target (libFuzzer's `-max_total_time`).
    #[arg(long, default_value_t = 600)]
    seconds: u32,
    /// Stop a target after this many executions instead, if that comes first (libFuzzer's `-runs`).
    #[arg(long)]
    runs: Option<u64>,
    /// Only this target (repeatable); every target by default.
    #[arg(long = "target", value_name = "TARGET", value_parser = clap::builder::PossibleValuesParser::new(FUZZ_TARGETS))]
    targets: Vec<String>,
    /// Build without AddressSanitizer (`cargo fuzz -s none`): several times the executions per second, for
    /// runs of ≥ 10,000,000 executions. Panics, overflow checks and debug assertions still fail the target;
    /// memory errors in `unsafe` code (there is none in the parsers) would go unseen.
    #[arg(long)]
    no_sanitizer: bool,
}

/// `cargo xtask fuzz [--seconds N] [--runs N] [--target T]...`: one long run of each target, one at a time.
pub fn run(args: &FuzzArgs) -> anyhow::Result<()> {
    bootstrap::ensure()?;
    let targets: Vec<&str> = if args.targets.is_empty() {
        FUZZ_TARGETS.to_vec()
    } else {
        args.targets.iter().map(String::as_str).collect()
    };
    let limits = Limits {
        seconds: args.seconds,
        runs: args.runs,
        sanitizer: if args.no_sanitizer {
            Sanitizer::None
        } else {
            Sanitizer::Address
        },
    };
    run_targets(&targets, limits, Corpus::Kept)
}

/// How long each target runs, and how it is built.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub seconds: u32,
    pub runs: Option<u64>,
    pub sanitizer: Sanitizer,
}

/// `cargo fuzz --sanitizer`: the build and the runs must name the same one, or `run` rebuilds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sanitizer {
    /// AddressSanitizer (cargo fuzz's default): what CI's short step uses.
    Address,
    /// No sanitizer: for long runs' throughput.
    None,
}

impl Sanitizer {
    fn flag(self) -> &'static str {
        match self {
            Self::Address => "--sanitizer=address",
            Self::None => "--sanitizer=none",
        }
    }
}

/// Where new inputs go (the first corpus directory libFuzzer is given; the seeds are the second, so that
/// they stay as checked in).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Corpus {
    /// `fuzz/target/xtask-corpus/TARGET`, emptied first (the test step: every run starts from the seeds).
    Scratch,
    /// `fuzz/corpus/TARGET`, kept between runs (long runs).
    Kept,
}

/// Builds the fuzz targets, then runs `targets` one after the other; fails if any of them failed.
pub fn run_targets(targets: &[&str], limits: Limits, corpus: Corpus) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut build = cargo_fuzz();
    build
        .arg("build")
        .arg("--debug-assertions")
        .arg(limits.sanitizer.flag());
    util::heading(&util::display(&build));
    util::run(&mut build)?;
    let fuzz_dir = util::workspace_root().join("fuzz");
    let mut summaries = Vec::new();
    let mut failed = Vec::new();
    for target in targets {
        match run_target(&fuzz_dir, target, limits, corpus) {
            Ok(summary) => summaries.push(summary),
            Err(e) => {
                summaries.push(format!("{target}: FAILED: {e:#}"));
                failed.push(*target);
            }
        }
    }
    println!();
    for summary in &summaries {
        println!("fuzz: {summary}");
    }
    if !failed.is_empty() {
        bail!(
            "fuzz targets failed: {} (inputs in {})",
            failed.join(", "),
            fuzz_dir.join("artifacts").display()
        );
    }
    println!(
        "fuzz: {} targets passed in {:.0} s (build included)",
        targets.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `cargo fuzz` on rustup's nightly (bootstrap installs both), in the workspace root.
fn cargo_fuzz() -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", bootstrap::NIGHTLY_TOOLCHAIN, "cargo", "fuzz"])
        .current_dir(util::workspace_root())
        .env("PATH", util::child_path())
        // `cargo xtask` runs under the stable cargo: let cargo-fuzz find nightly's through rustup.
        .env_remove("CARGO");
    cmd
}

fn corpus_dir(fuzz_dir: &Path, target: &str, corpus: Corpus) -> anyhow::Result<PathBuf> {
    let dir = match corpus {
        Corpus::Scratch => fuzz_dir.join("target").join("xtask-corpus").join(target),
        Corpus::Kept => fuzz_dir.join("corpus").join(target),
    };
    if corpus == Corpus::Scratch && dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// One bounded run of `target`; returns its one-line summary.
fn run_target(fuzz_dir: &Path, target: &str, limits: Limits, corpus: Corpus) -> anyhow::Result<String> {
    let seeds = fuzz_dir.join("seeds").join(target);
    if !seeds.is_dir() {
        bail!(
            "no seeds in {} (regenerate them with `cargo +{} run --manifest-path fuzz/Cargo.toml --example make_seeds`)",
            seeds.display(),
            bootstrap::NIGHTLY_TOOLCHAIN
        );
    }
    let corpus = corpus_dir(fuzz_dir, target, corpus)?;
    let mut cmd = cargo_fuzz();
    cmd.args(["run", "--debug-assertions", limits.sanitizer.flag(), target])
        .arg(&corpus)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={}", limits.seconds))
        .arg(format!("-rss_limit_mb={FUZZ_RSS_LIMIT_MB}"))
        .arg(format!("-malloc_limit_mb={FUZZ_MALLOC_LIMIT_MB}"))
        .arg(format!("-timeout={FUZZ_INPUT_TIMEOUT_S}"))
        .arg("-print_final_stats=1");
    if let Some(runs) = limits.runs {
        cmd.arg(format!("-runs={runs}"));
    }
    util::heading(&util::display(&cmd));
    let started = Instant::now();
    let mut child = cmd
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run `{}`", util::display(&cmd)))?;
    let stderr = child.stderr.take().expect("stderr is piped");
    let mut stats = FuzzStats::default();
    let mut quiet = QuietFilter::default();
    // Split on bytes, not `lines()`: a crash report may quote an input that is not UTF-8, and an error here
    // must not leave the fuzzer running unwaited.
    for line in BufReader::new(stderr).split(b'\n') {
        let Ok(line) = line else { break };
        let line = String::from_utf8_lossy(&line);
        stats.read_line(&line);
        if quiet.shows(&line) {
            eprintln!("{line}");
        }
    }
    let status = child.wait()?;
    let wall = started.elapsed().as_secs_f64();
    if !status.success() {
        bail!(
            "{status} after {} runs: the input is in {} (reproduce it with \
             `cargo +{} fuzz run --debug-assertions {} {target} fuzz/artifacts/{target}/FILE`)",
            stats.runs.map_or_else(|| "?".to_string(), |r| r.to_string()),
            fuzz_dir.join("artifacts").join(target).display(),
            bootstrap::NIGHTLY_TOOLCHAIN,
            limits.sanitizer.flag()
        );
    }
    Ok(stats.summary(target, wall))
}

/// Leaves out what libFuzzer prints for every new input (`#1234\tNEW …`, `REDUCE`, `pulse`, `NEW_FUNC`) and
/// its closing recommended dictionary; everything else (the start, `DONE`, the stats, any crash report) shows.
#[derive(Default)]
struct QuietFilter {
    in_dictionary: bool,
}

impl QuietFilter {
    fn shows(&mut self, line: &str) -> bool {
        if line.starts_with("###### Recommended dictionary") {
            self.in_dictionary = true;
        } else if line.starts_with("###### End of recommended dictionary") {
            self.in_dictionary = false;
            return false;
        }
        let progress = line.starts_with('#')
            && ["\tNEW ", "\tREDUCE ", "\tpulse ", "\tRELOAD "]
                .iter()
                .any(|tag| line.contains(tag));
        !(self.in_dictionary || progress || line.starts_with("\tNEW_FUNC["))
    }
}

/// What `-print_final_stats=1` and the `DONE` line report.
#[derive(Debug, Default, PartialEq)]
struct FuzzStats {
    runs: Option<u64>,
    execs_per_sec: Option<u64>,
    peak_rss_mb: Option<u64>,
    /// `corp: N/…` of the `DONE` line.
    corpus: Option<u64>,
}

impl FuzzStats {
    fn read_line(&mut self, line: &str) {
        let value = |prefix: &str| {
            line.strip_prefix(prefix)
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if let Some(v) = value("stat::number_of_executed_units:") {
            self.runs = Some(v);
        } else if let Some(v) = value("stat::average_exec_per_sec:") {
            self.execs_per_sec = Some(v);
        } else if let Some(v) = value("stat::peak_rss_mb:") {
            self.peak_rss_mb = Some(v);
        } else if line.contains("\tDONE ") {
            self.corpus = line
                .split_whitespace()
                .skip_while(|w| *w != "corp:")
                .nth(1)
                .and_then(|c| c.split('/').next()?.parse().ok());
        }
    }

    fn summary(&self, target: &str, wall: f64) -> String {
        let n = |v: Option<u64>| v.map_or_else(|| "?".to_string(), |v| v.to_string());
        format!(
            "{target}: {} runs in {wall:.0} s ({} exec/s), 0 crashes, corpus {} inputs, peak RSS {} MB",
            n(self.runs),
            n(self.execs_per_sec),
            n(self.corpus),
            n(self.peak_rss_mb)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libfuzzer_final_stats_are_read() {
        let mut stats = FuzzStats::default();
        for line in [
            "#115670\tDONE   cov: 1551 ft: 4989 corp: 419/335Kb lim: 3200 exec/s: 4448 rss: 424Mb",
            "Done 115670 runs in 26 second(s)",
            "stat::number_of_executed_units: 115670",
            "stat::average_exec_per_sec:     4448",
            "stat::new_units_added:          1133",
            "stat::peak_rss_mb:              424",
        ] {
            stats.read_line(line);
        }
        assert_eq!(
            stats,
            FuzzStats {
                runs: Some(115670),
                execs_per_sec: Some(4448),
                peak_rss_mb: Some(424),
                corpus: Some(419),
            }
        );
        assert_eq!(
            stats.summary("client_hello", 21.4),
            "client_hello: 115670 runs in 21 s (4448 exec/s), 0 crashes, corpus 419 inputs, peak RSS 424 MB"
        );
    }

    #[test]
    fn progress_and_dictionary_lines_are_left_out() {
        let mut quiet = QuietFilter::default();
        let shown: Vec<&str> = [
            "INFO:       15 files found in fuzz/seeds/client_hello",
            "#16\tINITED cov: 1124 ft: 1821 corp: 15/13417b exec/s: 0 rss: 58Mb",
            "#1024\tNEW    cov: 1200 ft: 3000 corp: 100/50Kb lim: 1200 exec/s: 4000 rss: 300Mb L: 5/9 MS: 1 CMP-",
            "\tNEW_FUNC[1/1]: 0x5565c042d4c0 in core::ptr::drop_glue::<detector_user::ClientHello>",
            "#262144\tpulse  cov: 266 ft: 290 corp: 50/2817b lim: 2528 exec/s: 29127 rss: 271Mb",
            "#115670\tDONE   cov: 1551 ft: 4989 corp: 419/335Kb lim: 3200 exec/s: 4448 rss: 424Mb",
            "###### Recommended dictionary. ######",
            "\"\\001\\000\" # Uses: 158",
            "###### End of recommended dictionary. ######",
            "Done 115670 runs in 26 second(s)",
            "==1234== ERROR: libFuzzer: deadly signal",
            "thread '<unnamed>' panicked at src/lib.rs:1:1:",
        ]
        .into_iter()
        .filter(|l| quiet.shows(l))
        .collect();
        assert_eq!(
            shown,
            [
                "INFO:       15 files found in fuzz/seeds/client_hello",
                "#16\tINITED cov: 1124 ft: 1821 corp: 15/13417b exec/s: 0 rss: 58Mb",
                "#115670\tDONE   cov: 1551 ft: 4989 corp: 419/335Kb lim: 3200 exec/s: 4448 rss: 424Mb",
                "Done 115670 runs in 26 second(s)",
                "==1234== ERROR: libFuzzer: deadly signal",
                "thread '<unnamed>' panicked at src/lib.rs:1:1:",
            ]
        );
    }

    #[test]
    fn every_target_has_a_source_and_seeds() {
        let fuzz_dir = util::workspace_root().join("fuzz");
        let manifest = fs::read_to_string(fuzz_dir.join("Cargo.toml")).unwrap();
        for target in FUZZ_TARGETS {
            assert!(
                fuzz_dir
                    .join("fuzz_targets")
                    .join(format!("{target}.rs"))
                    .is_file(),
                "{target}"
            );
            assert!(manifest.contains(&format!("name = \"{target}\"")), "{target}");
            let seeds = fs::read_dir(fuzz_dir.join("seeds").join(target)).unwrap().count();
            assert!(seeds > 0, "{target} has no seeds");
        }
        let sources = fs::read_dir(fuzz_dir.join("fuzz_targets")).unwrap().count();
        assert_eq!(sources, FUZZ_TARGETS.len(), "a target missing from FUZZ_TARGETS");
    }
}

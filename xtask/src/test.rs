//! `cargo xtask test`: bootstrap, build the workspace, run every test, then a short run of each fuzz target.
//!
//! The end-to-end tests run the real `aqd` binary; its path is passed in `AQD_BIN`. Tests load XDP programs and
//! create network namespaces, so this needs root. The eBPF crate is excluded from `--workspace`: it only builds
//! for `bpfel-unknown-none` (through detector-user's build.rs), and building it for the host fails.
//!
//! The fuzz step builds `fuzz/` with `cargo +nightly-2026-05-19 fuzz build` (the pinned `bootstrap::NIGHTLY_TOOLCHAIN`) (AddressSanitizer, the default) and runs each
//! target for `--fuzz-seconds` (libFuzzer's `-max_total_time`) from its checked-in seeds (`fuzz/seeds/TARGET`)
//! in a fresh scratch corpus, with memory limits: any panic, sanitizer report, timeout, allocation over
//! [`FUZZ_MALLOC_LIMIT_MB`] or RSS over [`FUZZ_RSS_LIMIT_MB`] fails the test, and libFuzzer leaves the input in
//! `fuzz/artifacts/TARGET/`.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};
use clap::Args;

use crate::{bootstrap, util};

/// The fuzz targets in `fuzz/fuzz_targets/`.
pub const FUZZ_TARGETS: [&str; 2] = ["client_hello", "event_decode"];
/// libFuzzer's `-malloc_limit_mb`: the largest single allocation a target may make. The code under test
/// never needs more than a few times its 16 KiB reassembly bound.
pub const FUZZ_MALLOC_LIMIT_MB: u32 = 64;
/// libFuzzer's `-rss_limit_mb` (its default, made explicit): ASan's quarantine alone keeps a few hundred MB.
pub const FUZZ_RSS_LIMIT_MB: u32 = 2048;
/// libFuzzer's `-timeout`: one input taking longer than this is a failure (a hang).
const FUZZ_INPUT_TIMEOUT_S: u32 = 10;

#[derive(Args)]
pub struct TestArgs {
    /// Seconds of fuzzing per fuzz target after the tests (0 skips the fuzz step).
    #[arg(long, default_value_t = 20)]
    fuzz_seconds: u32,
    /// Passed to `cargo test` after the xtask's own `--`, e.g. `cargo xtask test -- e2e -- --nocapture`.
    #[arg(last = true)]
    cargo_test_args: Vec<String>,
}

/// `cargo xtask test [--fuzz-seconds N] [-- <cargo test args>]`.
pub fn run(args: &TestArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    util::require_root("`cargo xtask test`")?;
    bootstrap::ensure()?;
    let built = util::cargo_build(&["--workspace", "--exclude", "detector-ebpf"])?;
    let aqd = util::find_binary(&built, "aqd")?;
    let mut cargo = util::cargo();
    cargo
        .args([
            "test",
            "--workspace",
            "--exclude",
            "detector-ebpf",
            "--no-fail-fast",
        ])
        .args(&args.cargo_test_args)
        .env("AQD_BIN", &aqd);
    util::heading(&format!("AQD_BIN={} {}", aqd.display(), util::display(&cargo)));
    let tests = util::run(&mut cargo);
    // The fuzz step runs even when a test failed; the test failure is reported first.
    let fuzz = if args.fuzz_seconds == 0 {
        println!("\nxtask test: fuzz step skipped (--fuzz-seconds 0)");
        Ok(())
    } else {
        fuzz(args.fuzz_seconds)
    };
    tests?;
    fuzz?;
    println!("\nxtask test: passed in {:.0} s", started.elapsed().as_secs_f64());
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

/// Builds the fuzz targets, then runs each for `seconds` from its seeds.
fn fuzz(seconds: u32) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut build = cargo_fuzz();
    build.arg("build");
    util::heading(&util::display(&build));
    util::run(&mut build)?;
    let fuzz_dir = util::workspace_root().join("fuzz");
    let mut summaries = Vec::new();
    for target in FUZZ_TARGETS {
        summaries.push(fuzz_target(&fuzz_dir, target, seconds)?);
    }
    println!();
    for summary in summaries {
        println!("fuzz: {summary}");
    }
    println!(
        "fuzz: {} targets passed in {:.0} s (build included)",
        FUZZ_TARGETS.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// One bounded run of `target`; returns its one-line summary.
fn fuzz_target(fuzz_dir: &Path, target: &str, seconds: u32) -> anyhow::Result<String> {
    let seeds = fuzz_dir.join("seeds").join(target);
    // New inputs go to the first corpus directory: a scratch one, so that the seeds stay as checked in.
    let scratch = fuzz_dir.join("target").join("xtask-corpus").join(target);
    if scratch.exists() {
        fs::remove_dir_all(&scratch).with_context(|| format!("removing {}", scratch.display()))?;
    }
    fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let mut cmd = cargo_fuzz();
    cmd.args(["run", target])
        .arg(&scratch)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-rss_limit_mb={FUZZ_RSS_LIMIT_MB}"))
        .arg(format!("-malloc_limit_mb={FUZZ_MALLOC_LIMIT_MB}"))
        .arg(format!("-timeout={FUZZ_INPUT_TIMEOUT_S}"))
        .arg("-print_final_stats=1");
    util::heading(&util::display(&cmd));
    let started = Instant::now();
    let mut child = cmd
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run `{}`", util::display(&cmd)))?;
    let stderr = child.stderr.take().expect("stderr is piped");
    let mut stats = FuzzStats::default();
    let mut quiet = QuietFilter::default();
    for line in BufReader::new(stderr).lines() {
        let line = line.context("reading the fuzzer's output")?;
        stats.read_line(&line);
        if quiet.shows(&line) {
            eprintln!("{line}");
        }
    }
    let status = child.wait()?;
    let wall = started.elapsed().as_secs_f64();
    if !status.success() {
        bail!(
            "fuzz target {target} failed ({status}): the input is in {} (reproduce it with \
             `cargo +nightly-2026-05-19 fuzz run {target} fuzz/artifacts/{target}/FILE`)",
            fuzz_dir.join("artifacts").join(target).display()
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
            "{target}: {} runs in {wall:.0} s ({} exec/s), corpus {} inputs, peak RSS {} MB",
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
            "client_hello: 115670 runs in 21 s (4448 exec/s), corpus 419 inputs, peak RSS 424 MB"
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
}

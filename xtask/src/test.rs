//! `cargo xtask test`: bootstrap, build the workspace, run every test, then a short run of each fuzz target.
//!
//! The end-to-end tests run the real `aqd` binary; its path is passed in `AQD_BIN`. Tests load XDP programs and
//! create network namespaces, so this needs root. The eBPF crate is excluded from `--workspace`: it only builds
//! for `bpfel-unknown-none` (through detector-user's build.rs), and building it for the host fails.
//!
//! The fuzz step runs every target of [`fuzz::FUZZ_TARGETS`] for `--fuzz-seconds` (libFuzzer's
//! `-max_total_time`) from its checked-in seeds in a fresh scratch corpus, with the runner and limits of
//! `cargo xtask fuzz` ([`crate::fuzz`]): any panic, sanitizer report, timeout or memory limit fails the test.

use std::time::Instant;

use clap::Args;

use crate::{
    bootstrap,
    fuzz::{self, Corpus, FUZZ_TARGETS, Limits, Sanitizer},
    util,
};

#[derive(Args)]
pub struct TestArgs {
    /// Seconds of fuzzing per fuzz target after the tests (0 skips the fuzz step); 20 s × 11 targets.
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
        let limits = Limits {
            seconds: args.fuzz_seconds,
            runs: None,
            sanitizer: Sanitizer::Address,
        };
        fuzz::run_targets(&FUZZ_TARGETS, limits, Corpus::Scratch)
    };
    tests?;
    fuzz?;
    println!("\nxtask test: passed in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

//! `cargo xtask test`: bootstrap, build the workspace, run every test.
//!
//! The end-to-end tests run the real `aqd` binary; its path is passed in `AQD_BIN`. Tests load XDP programs and
//! create network namespaces, so this needs root. The eBPF crate is excluded from `--workspace`: it only builds
//! for `bpfel-unknown-none` (through detector-user's build.rs), and building it for the host fails.

use std::time::Instant;

use clap::Args;

use crate::{bootstrap, util};

#[derive(Args)]
pub struct TestArgs {
    /// Passed to `cargo test` after the xtask's own `--`, e.g. `cargo xtask test -- e2e -- --nocapture`.
    #[arg(last = true)]
    cargo_test_args: Vec<String>,
}

/// `cargo xtask test [-- <cargo test args>]`.
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
    util::run(&mut cargo)?;
    println!("\nxtask test: passed in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

//! `cargo xtask bench`: bootstrap, then the benchmarks: the data path (`datapath`: per-packet cost vs a bare
//! XDP_PASS floor and xdp-filter), the flood over a veth (`flood`: Mpps of aqd, a bare XDP_DROP, xdp-filter and nft
//! netdev ingress under a live-frames XDP_TX generator, then HTTPS requests/s with and without `aqd run`), the
//! control plane (`control`: decisions per second, daemon memory, JA4 throughput) and the model (`model`:
//! observations per second, bytes per tracked source).
//!
//! cargo's exit status is propagated as is (including when the bench target does not exist).

use clap::Args;

use crate::{bootstrap, util};

#[derive(Args)]
pub struct BenchArgs {
    /// Passed to the benchmark after `--`, e.g. `cargo xtask bench -- --quick`.
    #[arg(last = true)]
    bench_args: Vec<String>,
}

/// `cargo xtask bench [-- <bench args>]`.
pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    bootstrap::ensure()?;
    let mut cargo = util::cargo();
    cargo.args([
        "bench",
        "-p",
        "aqd-tests",
        "--bench",
        "datapath",
        "--bench",
        "control",
        "--bench",
        "flood",
    ]);
    if !args.bench_args.is_empty() {
        cargo.arg("--").args(&args.bench_args);
    }
    util::heading(&util::display(&cargo));
    util::run(&mut cargo)?;
    // The behavioural model: observations scored per second on one core, bytes per tracked source.
    let mut model = util::cargo();
    model.args(["bench", "-p", "detector-user", "--bench", "model"]);
    if !args.bench_args.is_empty() {
        model.arg("--").args(&args.bench_args);
    }
    util::heading(&util::display(&model));
    util::run(&mut model)
}

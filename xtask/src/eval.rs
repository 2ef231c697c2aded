//! `cargo xtask eval [--scenario FILE]... [--families N [--seed S]] [--json] [--train] [--open-loop]`: bootstrap, then run the behavioural model's
//! evaluation harness (`detector-user`'s `model-eval` example, release mode) on the shipped scenarios
//! (`scenarios/eval/`) or the given files, closed loop (decisions act on the simulated traffic), and print per
//! population and per family how fast campaign sources are throttled or blocked, how many campaign requests are
//! still answered, and the harm to honest sources, side by side with a naive per-IP leaky bucket. `--train` first refits the shipped weights
//! (`detector-user/src/model/weights.toml`) on `scenarios/train/`.
//!
//! An example run through cargo rather than a library call: depending on detector-user would make xtask build
//! the eBPF program before `bootstrap` has installed its toolchain.

use std::path::PathBuf;

use clap::Args;

use crate::{bootstrap, util};

#[derive(Args)]
pub struct EvalArgs {
    /// A scenario file to run instead of every shipped one in scenarios/eval/ (repeatable).
    #[arg(long = "scenario", value_name = "FILE")]
    scenarios: Vec<PathBuf>,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
    /// Draw N scenarios from the documented families with randomized parameters instead of the shipped files.
    #[arg(long, value_name = "N")]
    families: Option<usize>,
    /// Master seed of the --families draw (evaluation and training draw from disjoint seed streams).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// With --families: also print one row per drawn scenario and population.
    #[arg(long)]
    per_scenario: bool,
    /// Open loop: record decisions without enforcing them (default: closed loop, decisions act on the traffic).
    #[arg(long)]
    open_loop: bool,
    /// Retrain the shipped weights on scenarios/train/ before evaluating (rewrites
    /// detector-user/src/model/weights.toml).
    #[arg(long)]
    train: bool,
}

/// `cargo xtask eval`.
pub fn run(args: &EvalArgs) -> anyhow::Result<()> {
    bootstrap::ensure()?;
    let mut cargo = util::cargo();
    cargo.args([
        "run",
        "--quiet",
        "--release",
        "-p",
        "detector-user",
        "--example",
        "model-eval",
        "--",
    ]);
    let cwd = std::env::current_dir()?;
    for s in &args.scenarios {
        cargo.arg("--scenario").arg(cwd.join(s));
    }
    if args.json {
        cargo.arg("--json");
    }
    if args.train {
        cargo.arg("--train");
    }
    if let Some(n) = args.families {
        cargo.arg("--families").arg(n.to_string());
    }
    cargo.arg("--seed").arg(args.seed.to_string());
    if args.per_scenario {
        cargo.arg("--per-scenario");
    }
    if args.open_loop {
        cargo.arg("--open-loop");
    }
    if !args.json {
        util::heading(&util::display(&cargo));
    }
    util::run(&mut cargo)
}

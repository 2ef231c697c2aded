//! The evaluation harness's runner (`cargo xtask eval` runs this in release mode): drives the behavioural model
//! with generated scenarios and prints a table (or JSON); `--train` refits the shipped weights on
//! `scenarios/train/` first.
//!
//! An example rather than part of `aqd` or xtask: xtask cannot depend on detector-user (its build.rs compiles
//! the eBPF program, which needs the toolchain `cargo xtask bootstrap` installs).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use detector_user::model::WeightsFile;
use detector_user::model::eval::{self, Scenario, families};
use detector_user::model::train;

#[derive(Parser)]
#[command(
    name = "model-eval",
    about = "Evaluate (and train) the behavioural model on scenario files"
)]
struct Args {
    /// Scenario files to run (default: every *.toml in scenarios/eval/).
    #[arg(long = "scenario", value_name = "FILE")]
    scenarios: Vec<PathBuf>,
    /// Print JSON instead of the table.
    #[arg(long)]
    json: bool,
    /// Draw this many scenarios from the documented families (detector_user::model::eval::families) instead of
    /// reading files; prints the per-family table.
    #[arg(long, value_name = "N")]
    families: Option<usize>,
    /// Master seed of the --families draw.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// With --families: also print one row per drawn scenario and population.
    #[arg(long)]
    per_scenario: bool,
    /// With --train: also train on this many scenarios drawn from the families' training seed stream (never
    /// the evaluation stream).
    #[arg(long, value_name = "N")]
    train_families: Option<usize>,
    /// Open loop: record decisions without enforcing them (the naive bucket watches the same stream).
    #[arg(long)]
    open_loop: bool,
    /// Weights file to evaluate (default: the shipped detector-user/src/model/weights.toml).
    #[arg(long, value_name = "FILE")]
    weights: Option<PathBuf>,
    /// Retrain on scenarios/train/ (or --train-scenario files) and write the weights to --out, then evaluate.
    #[arg(long)]
    train: bool,
    #[arg(long = "train-scenario", value_name = "FILE")]
    train_scenarios: Vec<PathBuf>,
    /// Where --train writes the weights (default: the shipped weights file).
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// L2 penalty for training.
    #[arg(long, default_value_t = 0.001)]
    l2: f64,
    /// Share of benign training entities allowed to score above the calibration anchor (0: the highest one).
    #[arg(long, default_value_t = 0.0)]
    fp_budget: f64,
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("detector-user is one level below the workspace root")
}

fn toml_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    v.sort();
    Ok(v)
}

fn load(paths: &[PathBuf]) -> anyhow::Result<Vec<Scenario>> {
    paths
        .iter()
        .map(|p| Scenario::load(p).map_err(anyhow::Error::from))
        .collect()
}

fn run(args: Args) -> anyhow::Result<()> {
    let shipped = root().join("detector-user/src/model/weights.toml");
    let mut weights = match &args.weights {
        Some(p) => WeightsFile::parse(
            &std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?,
        )?,
        None => WeightsFile::shipped(),
    };
    if args.train {
        let files = if args.train_scenarios.is_empty() {
            toml_files(&root().join("scenarios/train"))?
        } else {
            args.train_scenarios.clone()
        };
        let mut scs = load(&files)?;
        if let Some(n) = args.train_families {
            scs.extend(families::draw(n, args.seed, families::Purpose::Train));
        }
        let t = std::time::Instant::now();
        let (w, log) = train::train(&scs, &weights, args.l2, args.fp_budget);
        let out = args.out.clone().unwrap_or(shipped);
        let header = "# Trained by `cargo xtask eval --train` on scenarios/train/ — do not edit by hand.\n";
        std::fs::write(&out, format!("{header}{}", w.to_toml()))
            .with_context(|| format!("cannot write {}", out.display()))?;
        eprint!("{log}");
        eprintln!(
            "trained in {:.1} s; wrote {}",
            t.elapsed().as_secs_f64(),
            out.display()
        );
        weights = w;
    }
    let scs = if let Some(n) = args.families {
        families::draw(n, args.seed, families::Purpose::Eval)
    } else {
        let files = if args.scenarios.is_empty() {
            toml_files(&root().join("scenarios/eval"))?
        } else {
            args.scenarios.clone()
        };
        load(&files)?
    };
    let t0 = std::time::Instant::now();
    let mut results = Vec::new();
    for sc in &scs {
        let r = if args.open_loop {
            eval::run(sc, &weights, None)
        } else {
            eval::run_closed(sc, &weights)
        };
        if !args.json {
            eprintln!(
                "{}: {} observations, {} decisions, {:.0} s simulated in {:.2} s",
                r.scenario,
                r.observations,
                r.decisions,
                r.duration_s,
                r.wall_ms as f64 / 1000.0
            );
        }
        results.push(r);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        if args.families.is_none() || args.per_scenario {
            print!("{}", eval::render_populations(&results));
        }
        print!("{}", eval::render_families(&results));
        eprintln!(
            "{} scenarios in {:.1} s",
            results.len(),
            t0.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("model-eval: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

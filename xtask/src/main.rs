//! `cargo xtask`: developer and CI tasks for aqd.
//!
//! One module per subcommand. Every task that builds (`test`, `demo`, `bench`) first runs [`bootstrap`], which
//! installs the eBPF toolchain when it is missing and is a near-instant no-op when it is present.
//!
//! Exit codes: 0 success; the exit code of a failed child command (`cargo test`, `cargo bench`, ...) when one
//! failed; 1 for any other error.

mod bench;
mod bootstrap;
mod demo;
mod eval;
mod fuzz;
mod kernels;
mod test;
mod util;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "xtask",
    bin_name = "cargo xtask",
    about = "Developer and CI tasks for aqd"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install the eBPF toolchain and the tools the tests need, if missing (apt-get and cargo install; root).
    Bootstrap(bootstrap::BootstrapArgs),
    /// Build the workspace and run all tests (root; creates and removes its own network namespaces).
    Test(test::TestArgs),
    /// Build aqd and run the lab demo: two network namespaces, a veth, block and unblock a client.
    Demo(demo::DemoArgs),
    /// Run the data-path benchmark (`cargo bench -p aqd-tests --bench datapath`).
    Bench(bench::BenchArgs),
    /// Evaluate the behavioural model on the shipped scenarios (or --scenario FILE), side by side with a naive
    /// per-IP leaky bucket; --train refits the shipped weights on scenarios/train/ first.
    Eval(eval::EvalArgs),
    /// Run the fuzz targets long, one at a time (every target, or --target T), keeping the corpus in
    /// fuzz/corpus/; --seconds per target, --runs to stop at an execution count.
    Fuzz(fuzz::FuzzArgs),
    /// Boot Debian's 6.1 and 6.12 kernels (and the running one) under qemu/KVM and run the kernel tests on
    /// each; installs qemu and downloads the kernels when missing (root; not part of `test`).
    Kernels(kernels::KernelsArgs),
    /// Send UDP datagrams (used by `demo` inside the client namespace).
    #[command(hide = true)]
    DemoSend(demo::SendArgs),
    /// Count UDP datagrams for a bounded time (used by `demo` inside the server namespace).
    #[command(hide = true)]
    DemoRecv(demo::RecvArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bootstrap(args) => bootstrap::run(&args),
        Command::Test(args) => test::run(&args),
        Command::Demo(args) => demo::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Eval(args) => eval::run(&args),
        Command::Fuzz(args) => fuzz::run(&args),
        Command::Kernels(args) => kernels::run(&args),
        Command::DemoSend(args) => demo::send(&args),
        Command::DemoRecv(args) => demo::receive(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            // Propagate the exit code of a failed child (e.g. cargo test's 101) so CI sees the same status.
            let code = e
                .chain()
                .find_map(|c| c.downcast_ref::<util::CommandFailed>())
                .and_then(|f| f.code)
                .and_then(|c| u8::try_from(c).ok())
                .filter(|c| *c != 0)
                .unwrap_or(1);
            ExitCode::from(code)
        }
    }
}

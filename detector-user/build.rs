//! Builds the XDP program with aya-build so the `aqd` binary embeds it.
//!
//! The eBPF crate is compiled by Debian's packaged rustc (`rustup run /usr cargo`), which ships a precompiled BPF
//! `core`; see ../shared/TOOLCHAIN.md. `cargo xtask bootstrap` installs that toolchain when it is missing.
use anyhow::Context as _;
use aya_build::{Package, Toolchain};

/// The toolchain that builds the eBPF crate: Debian's rustc-web under /usr (overridable for other setups).
const DEFAULT_EBPF_TOOLCHAIN: &str = "/usr";

fn main() -> anyhow::Result<()> {
    // `cargo fuzz` builds with `--cfg fuzzing` (cargo passes it here as CARGO_CFG_FUZZING). The fuzz targets
    // (../fuzz) never load the XDP program, so they get an empty object instead of a second eBPF build with
    // its own toolchain; `loader::PROGRAM_OBJECT` is then empty and unusable, which only fuzz builds see.
    if std::env::var_os("CARGO_CFG_FUZZING").is_some() {
        let out_dir = std::env::var_os("OUT_DIR").context("OUT_DIR not set")?;
        std::fs::write(std::path::Path::new(&out_dir).join("detector-ebpf"), [])?;
        return Ok(());
    }
    println!("cargo:rerun-if-env-changed=AQD_EBPF_TOOLCHAIN");
    let toolchain =
        std::env::var("AQD_EBPF_TOOLCHAIN").unwrap_or_else(|_| DEFAULT_EBPF_TOOLCHAIN.to_string());
    let root_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../detector-ebpf");
    // aya-build watches the eBPF crate; the object also compiles in detector-common's layouts.
    println!(
        "cargo:rerun-if-changed={}",
        concat!(env!("CARGO_MANIFEST_DIR"), "/../detector-common")
    );
    aya_build::build_ebpf(
        [Package {
            name: "detector-ebpf",
            root_dir,
            ..Default::default()
        }],
        Toolchain::Custom(&toolchain),
    )
    .context(
        "building the XDP program failed; run `cargo xtask bootstrap` to install the eBPF toolchain \
         (Debian rustc-web 1.96, llvm-22-dev, bpf-linker 0.13)",
    )
}

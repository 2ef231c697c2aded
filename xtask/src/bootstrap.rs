//! `cargo xtask bootstrap`: makes sure the eBPF toolchain and the test tools are installed.
//!
//! The eBPF crate is built by Debian's packaged Rust (`rustc-web`, with a precompiled `core` for
//! `bpfel-unknown-none` in `libstd-rust-web-dev-bpf`) and linked by bpf-linker built against Debian's LLVM 22 —
//! the same LLVM major as that rustc (see the README's toolchain note). The fuzz targets (`fuzz/`) need
//! rustup's nightly toolchain and cargo-fuzz. The check only asks `dpkg-query`, `bpf-linker --version`,
//! `rustup toolchain list` and `cargo-fuzz --version`, so it is near-instant when everything is present;
//! installing runs `apt-get` (root), `rustup toolchain install` and `cargo install`. When it cannot install, it
//! stops with the exact commands to run.

use std::{
    collections::HashMap,
    env,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::bail;
use clap::Args;

use crate::util;

/// The Debian Rust that builds the eBPF crate; all three packages are pinned to it.
pub const RUST_WEB_VERSION: &str = "1.96.0+dfsg1-1~deb12u2";
/// bpf-linker release, built with `--features llvm-22` against Debian's llvm-22-dev.
pub const BPF_LINKER_VERSION: &str = "0.13.0";
/// cargo-fuzz release that `cargo xtask test` runs the fuzz targets with (on rustup's nightly toolchain).
pub const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// The nightly the fuzz targets build with: dated, so a new nightly cannot break the test command overnight
/// (this one built and ran them here).
pub const NIGHTLY_TOOLCHAIN: &str = "nightly-2026-05-19";
/// Where llvm-22-dev puts `llvm-config`, which bpf-linker's build looks for on `PATH`.
const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";

/// A Debian package the build or the tests need.
#[derive(Debug)]
struct DebPackage {
    name: &'static str,
    /// Exact version required; `None` = any installed version.
    version: Option<&'static str>,
    purpose: &'static str,
}

const DEB_PACKAGES: &[DebPackage] = &[
    DebPackage {
        name: "llvm-22-dev",
        version: None,
        purpose: "LLVM 22, which bpf-linker is built against",
    },
    DebPackage {
        name: "rustc-web",
        version: Some(RUST_WEB_VERSION),
        purpose: "Debian's rustc, which compiles the eBPF crate",
    },
    DebPackage {
        name: "cargo-web",
        version: Some(RUST_WEB_VERSION),
        purpose: "the cargo that goes with rustc-web",
    },
    DebPackage {
        name: "libstd-rust-web-dev-bpf",
        version: Some(RUST_WEB_VERSION),
        purpose: "precompiled core/alloc for bpfel-unknown-none",
    },
    DebPackage {
        name: "iproute2",
        version: None,
        purpose: "`ip` for network namespaces in tests and the demo",
    },
    DebPackage {
        name: "ethtool",
        version: None,
        purpose: "veth offload settings in tests",
    },
    DebPackage {
        name: "xdp-tools",
        version: None,
        purpose: "benchmark peer and baseline",
    },
    DebPackage {
        name: "tcpdump",
        version: None,
        purpose: "packet captures in end-to-end tests",
    },
    DebPackage {
        name: "curl",
        version: None,
        purpose: "a real TLS client in the end-to-end fingerprint tests",
    },
    DebPackage {
        name: "openssl",
        version: None,
        purpose: "`openssl s_client` and the test certificate in the end-to-end fingerprint tests",
    },
    DebPackage {
        name: "python3",
        version: None,
        purpose: "the TLS test server and the Python `ssl`/`http.client` client in the fingerprint tests",
    },
    DebPackage {
        name: "nftables",
        version: None,
        purpose: "`nft` netdev ingress, the flood benchmark's in-kernel baseline",
    },
    DebPackage {
        name: "nghttp2-client",
        version: None,
        purpose: "`h2load`, the HTTPS load generator of the flood benchmark",
    },
    DebPackage {
        name: "nghttp2-server",
        version: None,
        purpose: "`nghttpd`, the HTTPS server of the flood benchmark",
    },
    DebPackage {
        name: "redis-server",
        version: None,
        purpose: "the Redis 7.0 server the fleet tests start on loopback (also gives `redis-cli`)",
    },
    DebPackage {
        name: "g++",
        version: None,
        purpose: "C++ compiler for libFuzzer (libfuzzer-sys, `cargo fuzz`)",
    },
];

#[derive(Args)]
pub struct BootstrapArgs {
    /// Only check: report what is missing and fail, without installing anything.
    #[arg(long)]
    check: bool,
}

/// `cargo xtask bootstrap [--check]`.
pub fn run(args: &BootstrapArgs) -> anyhow::Result<()> {
    if args.check {
        let started = Instant::now();
        let missing = Inventory::detect().missing();
        if missing.is_empty() {
            report_present(started);
            return Ok(());
        }
        bail!("{}", instructions(&missing, "--check was given"));
    }
    ensure()
}

/// Installs whatever is missing; a near-instant no-op when everything is present. Every task that builds calls it.
pub fn ensure() -> anyhow::Result<()> {
    let started = Instant::now();
    let missing = Inventory::detect().missing();
    if missing.is_empty() {
        report_present(started);
        return Ok(());
    }
    install(&missing)?;
    let still_missing = Inventory::detect().missing();
    if !still_missing.is_empty() {
        bail!(
            "{}",
            instructions(&still_missing, "they are still missing after installing")
        );
    }
    println!(
        "bootstrap: installed everything in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn report_present(started: Instant) {
    println!(
        "bootstrap: toolchain present (rustc-web {RUST_WEB_VERSION}, llvm-22-dev, bpf-linker \
         {BPF_LINKER_VERSION}, nightly, cargo-fuzz {CARGO_FUZZ_VERSION}; checked in {} ms)",
        started.elapsed().as_millis()
    );
}

/// What is on this machine.
#[derive(Debug, Default)]
struct Inventory {
    /// Package name → state, for the packages dpkg knows.
    packages: HashMap<String, DpkgEntry>,
    /// `bpf-linker --version` of the bpf-linker that cargo children would run, if any.
    bpf_linker: Option<(PathBuf, Option<String>)>,
    /// rustup is on `PATH` (aya-build runs `rustup run /usr cargo build` for the eBPF crate).
    rustup: bool,
    /// rustup has the pinned nightly toolchain (`cargo +nightly-… fuzz`).
    nightly: bool,
    /// `cargo-fuzz --version` of the cargo-fuzz on `PATH` or in `$CARGO_HOME/bin`, if any.
    cargo_fuzz: Option<(PathBuf, Option<String>)>,
    /// LLVM major version of Debian's rustc (`/usr/bin/rustc -vV`), when it is installed.
    rust_web_llvm_major: Option<u32>,
}

/// The packages pinned to [`RUST_WEB_VERSION`]: they must always be installed at one and the same version.
const RUST_WEB_PACKAGES: [&str; 3] = ["rustc-web", "cargo-web", "libstd-rust-web-dev-bpf"];
/// The LLVM major bpf-linker is built for; Debian's rustc must use the same one.
const LLVM_MAJOR: u32 = 22;

/// `LLVM version: 22.1.8` in `rustc -vV` → 22.
fn parse_llvm_major(rustc_vv: &str) -> Option<u32> {
    let line = rustc_vv.lines().find_map(|l| l.strip_prefix("LLVM version:"))?;
    line.trim().split('.').next()?.parse().ok()
}

/// One line of `dpkg-query -W`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct DpkgEntry {
    installed: bool,
    version: String,
}

/// Something to install.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Missing {
    Deb {
        name: &'static str,
        version: Option<&'static str>,
        purpose: &'static str,
        /// Installed version, when a different one is installed.
        found: Option<String>,
    },
    BpfLinker {
        /// Path and version of a bpf-linker that is not the required one.
        found: Option<(PathBuf, Option<String>)>,
    },
    Rustup,
    /// rustup's nightly toolchain.
    Nightly,
    CargoFuzz {
        /// Path and version of a cargo-fuzz that is not the required one.
        found: Option<(PathBuf, Option<String>)>,
    },
}

impl std::fmt::Display for Missing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Missing::Deb {
                name,
                version,
                purpose,
                found,
            } => {
                write!(f, "{}", deb_spec(name, *version))?;
                write!(f, " ({purpose}): ")?;
                match found {
                    Some(v) => write!(f, "version {v} is installed"),
                    None => write!(f, "not installed"),
                }
            }
            Missing::BpfLinker { found } => {
                write!(
                    f,
                    "bpf-linker {BPF_LINKER_VERSION} built with --features llvm-22 (links the eBPF object): "
                )?;
                match found {
                    Some((path, Some(v))) => write!(f, "{} is version {v}", path.display()),
                    Some((path, None)) => write!(f, "{} does not report a version", path.display()),
                    None => write!(f, "not found on PATH or in $CARGO_HOME/bin"),
                }
            }
            Missing::Rustup => write!(
                f,
                "rustup (aya-build builds the eBPF crate with `rustup run /usr cargo`): not found on PATH"
            ),
            Missing::Nightly => write!(
                f,
                "Rust nightly toolchain (`cargo fuzz` builds with sanitizers): not installed in rustup"
            ),
            Missing::CargoFuzz { found } => {
                write!(f, "cargo-fuzz {CARGO_FUZZ_VERSION} (runs the fuzz targets): ")?;
                match found {
                    Some((path, Some(v))) => write!(f, "{} is version {v}", path.display()),
                    Some((path, None)) => write!(f, "{} does not report a version", path.display()),
                    None => write!(f, "not found on PATH or in $CARGO_HOME/bin"),
                }
            }
        }
    }
}

impl Inventory {
    fn detect() -> Self {
        let names: Vec<&str> = DEB_PACKAGES.iter().map(|p| p.name).collect();
        let packages = match Command::new("dpkg-query")
            .args(["-W", "-f=${Package}\\t${db:Status-Abbrev}\\t${Version}\\n"])
            .args(&names)
            .output()
        {
            // dpkg-query exits 1 when some package is unknown; what it printed is still right.
            Ok(out) => parse_dpkg_query(&String::from_utf8_lossy(&out.stdout)),
            // No dpkg: not Debian; everything counts as missing and `install` explains.
            Err(_) => HashMap::new(),
        };
        let path = util::child_path();
        let tool_version = |name: &str| {
            util::find_in_path(name, &path).map(|tool| {
                let version = Command::new(&tool)
                    .arg("--version")
                    .output()
                    .ok()
                    .and_then(|out| parse_tool_version(&String::from_utf8_lossy(&out.stdout), name));
                (tool, version)
            })
        };
        let rustup = util::find_in_path("rustup", &path);
        let nightly = rustup.as_ref().is_some_and(|rustup| {
            Command::new(rustup)
                .args(["toolchain", "list"])
                .env("PATH", &path)
                .output()
                .is_ok_and(|out| has_nightly(&String::from_utf8_lossy(&out.stdout)))
        });
        let rust_web_llvm_major = Command::new("/usr/bin/rustc")
            .arg("-vV")
            .output()
            .ok()
            .and_then(|out| parse_llvm_major(&String::from_utf8_lossy(&out.stdout)));
        Inventory {
            packages,
            bpf_linker: tool_version("bpf-linker"),
            rustup: rustup.is_some(),
            nightly,
            cargo_fuzz: tool_version("cargo-fuzz"),
            rust_web_llvm_major,
        }
    }

    /// Debian's Rust is installed at another version than the pin, but consistently (all three packages at
    /// one version) and on the LLVM bpf-linker uses: the pinned version has left the mirror for a newer
    /// point release, which works just as well.
    fn rust_web_equivalent(&self) -> bool {
        let versions: Vec<&str> = RUST_WEB_PACKAGES
            .iter()
            .filter_map(|n| {
                self.packages
                    .get(*n)
                    .filter(|e| e.installed)
                    .map(|e| e.version.as_str())
            })
            .collect();
        versions.len() == RUST_WEB_PACKAGES.len()
            && versions.iter().all(|v| *v == versions[0])
            && self.rust_web_llvm_major == Some(LLVM_MAJOR)
    }

    /// What must be installed, in install order.
    fn missing(&self) -> Vec<Missing> {
        let mut missing: Vec<Missing> = DEB_PACKAGES
            .iter()
            .filter_map(|p| {
                let entry = self.packages.get(p.name).filter(|e| e.installed);
                let ok = match (entry, p.version) {
                    (Some(e), Some(wanted)) => e.version == wanted || self.rust_web_equivalent(),
                    (Some(_), None) => true,
                    (None, _) => false,
                };
                (!ok).then(|| Missing::Deb {
                    name: p.name,
                    version: p.version,
                    purpose: p.purpose,
                    found: entry.map(|e| e.version.clone()),
                })
            })
            .collect();
        let linker_ok = matches!(&self.bpf_linker, Some((_, Some(v))) if v == BPF_LINKER_VERSION);
        if !linker_ok {
            missing.push(Missing::BpfLinker {
                found: self.bpf_linker.clone(),
            });
        }
        if !self.rustup {
            missing.push(Missing::Rustup);
        }
        if !self.nightly {
            missing.push(Missing::Nightly);
        }
        let fuzz_ok = matches!(&self.cargo_fuzz, Some((_, Some(v))) if v == CARGO_FUZZ_VERSION);
        if !fuzz_ok {
            missing.push(Missing::CargoFuzz {
                found: self.cargo_fuzz.clone(),
            });
        }
        missing
    }
}

/// Parses `dpkg-query -W -f='${Package}\t${db:Status-Abbrev}\t${Version}\n'`. A package counts as installed
/// when the second status letter is `i` (`ii`, `hi`); `rc` (removed, config files left) does not.
fn parse_dpkg_query(output: &str) -> HashMap<String, DpkgEntry> {
    output
        .lines()
        .filter_map(|line| {
            let mut fields = line.split('\t');
            let name = fields.next()?.trim();
            let status = fields.next()?;
            let version = fields.next()?.trim();
            if name.is_empty() {
                return None;
            }
            let installed = status.chars().nth(1) == Some('i') && !version.is_empty();
            Some((
                name.to_string(),
                DpkgEntry {
                    installed,
                    version: version.to_string(),
                },
            ))
        })
        .collect()
}

/// `bpf-linker 0.13.0` → `0.13.0` (for `tool` = `bpf-linker`; likewise `cargo-fuzz 0.13.2`).
fn parse_tool_version(output: &str, tool: &str) -> Option<String> {
    let line = output.lines().find(|l| !l.trim().is_empty())?;
    let version = line.trim().strip_prefix(tool)?.split_whitespace().next()?;
    version
        .chars()
        .next()
        .filter(char::is_ascii_digit)
        .map(|_| version.to_string())
}

/// Whether `rustup toolchain list` shows [`NIGHTLY_TOOLCHAIN`] (`nightly-2026-05-19-x86_64-unknown-linux-gnu`).
fn has_nightly(toolchain_list: &str) -> bool {
    let host_prefix = format!("{NIGHTLY_TOOLCHAIN}-");
    toolchain_list.lines().any(|l| {
        l.split_whitespace()
            .next()
            .is_some_and(|t| t == NIGHTLY_TOOLCHAIN || t.starts_with(&host_prefix))
    })
}

fn deb_spec(name: &str, version: Option<&str>) -> String {
    match version {
        Some(v) => format!("{name}={v}"),
        None => name.to_string(),
    }
}

fn apt_install_args(missing: &[Missing]) -> Vec<String> {
    missing
        .iter()
        .filter_map(|m| match m {
            Missing::Deb { name, version, .. } => Some(deb_spec(name, *version)),
            _ => None,
        })
        .collect()
}

fn bpf_linker_install_args() -> [&'static str; 8] {
    [
        "install",
        "bpf-linker",
        "--version",
        BPF_LINKER_VERSION,
        "--locked",
        "--no-default-features",
        "--features",
        "llvm-22",
    ]
}

/// `--no-self-update`: installing a toolchain must not replace rustup itself.
fn nightly_install_args() -> [&'static str; 6] {
    [
        "toolchain",
        "install",
        NIGHTLY_TOOLCHAIN,
        "--profile",
        "minimal",
        "--no-self-update",
    ]
}

fn cargo_fuzz_install_args() -> [&'static str; 5] {
    [
        "install",
        "cargo-fuzz",
        "--version",
        CARGO_FUZZ_VERSION,
        "--locked",
    ]
}

/// The commands that install `missing`, one per line, as a root shell would run them.
fn commands(missing: &[Missing]) -> Vec<String> {
    let mut lines = Vec::new();
    let debs = apt_install_args(missing);
    if !debs.is_empty() {
        lines.push("apt-get update".to_string());
        lines.push(format!(
            "apt-get install -y --no-install-recommends {}",
            debs.join(" ")
        ));
    }
    if missing.iter().any(|m| matches!(m, Missing::BpfLinker { .. })) {
        lines.push(format!(
            "PATH={LLVM_BIN}:$PATH cargo {}",
            bpf_linker_install_args().join(" ")
        ));
    }
    if missing.contains(&Missing::Rustup) {
        lines.push(
            "# rustup: install it as described on https://rustup.rs (its stable toolchain builds userspace)"
                .into(),
        );
    }
    if missing.contains(&Missing::Nightly) {
        lines.push(format!("rustup {}", nightly_install_args().join(" ")));
    }
    if missing.iter().any(|m| matches!(m, Missing::CargoFuzz { .. })) {
        lines.push(format!("cargo {}", cargo_fuzz_install_args().join(" ")));
    }
    lines
}

/// The error text when bootstrap cannot (or may not) install: what is missing, why, and the exact commands.
fn instructions(missing: &[Missing], why: &str) -> String {
    let mut text = String::from("the eBPF toolchain or the test tools are incomplete:\n");
    for m in missing {
        text.push_str(&format!("  - {m}\n"));
    }
    text.push_str(&format!("`cargo xtask bootstrap` did not install them: {why}.\n"));
    text.push_str(
        "Install them yourself (apt-get as root; Debian 12 bookworm with bookworm-security in the apt sources), \
         then rerun:\n",
    );
    for line in commands(missing) {
        text.push_str(&format!("    {line}\n"));
    }
    text.push_str("(the README's \"Toolchain\" section explains the pins)");
    text
}

/// What `install` needs from the host.
#[derive(Debug, Clone, Copy)]
struct Host {
    root: bool,
    /// apt-get on `PATH` and /etc/debian_version present.
    apt: bool,
    /// `llvm-config` of LLVM 22 present (bpf-linker's build needs it).
    llvm_config: bool,
}

impl Host {
    fn detect() -> Self {
        Host {
            root: util::is_root(),
            apt: util::find_in_path("apt-get", &env::var_os("PATH").unwrap_or_default()).is_some()
                && Path::new("/etc/debian_version").exists(),
            llvm_config: Path::new(LLVM_BIN).join("llvm-config").exists(),
        }
    }
}

/// Why `missing` cannot be installed on `host`, if it cannot. Checked before changing anything.
fn cannot_install(missing: &[Missing], host: Host) -> Option<String> {
    let debs = !apt_install_args(missing).is_empty();
    let linker = missing.iter().any(|m| matches!(m, Missing::BpfLinker { .. }));
    let llvm_from_apt = missing.iter().any(|m| {
        matches!(
            m,
            Missing::Deb {
                name: "llvm-22-dev",
                ..
            }
        )
    });
    if missing.contains(&Missing::Rustup) {
        Some("rustup is not a Debian package; install it first".into())
    } else if debs && !host.apt {
        Some("this is not a Debian system with apt-get (the pinned packages are Debian 12's)".into())
    } else if debs && !host.root {
        Some("installing Debian packages needs root".into())
    } else if linker && !host.llvm_config && !llvm_from_apt {
        Some(format!(
            "{LLVM_BIN}/llvm-config is missing although llvm-22-dev is installed"
        ))
    } else {
        None
    }
}

fn install(missing: &[Missing]) -> anyhow::Result<()> {
    if let Some(why) = cannot_install(missing, Host::detect()) {
        bail!("{}", instructions(missing, &why));
    }
    util::heading("bootstrap: installing the missing parts of the toolchain");
    for m in missing {
        println!("    missing: {m}");
    }
    let debs = apt_install_args(missing);
    if !debs.is_empty() {
        apt_get(&["update"], missing)?;
        let mut install = vec!["install", "-y", "--no-install-recommends"];
        install.extend(debs.iter().map(String::as_str));
        if let Err(e) = apt_get(&install, missing) {
            // The mirror keeps only the newest point release of a package: when the pin has gone, take
            // the current rustc-web/cargo-web/libstd together; the check afterwards insists on LLVM 22.
            if !debs.iter().any(|d| d.contains(RUST_WEB_VERSION)) {
                return Err(e);
            }
            println!(
                "bootstrap: warning: {RUST_WEB_VERSION} is not installable ({e:#}); trying the current \
                 Debian release of rustc-web, cargo-web and libstd-rust-web-dev-bpf"
            );
            let unpinned: Vec<String> = debs
                .iter()
                .map(|d| d.split('=').next().unwrap_or(d).to_string())
                .collect();
            let mut retry = vec!["install", "-y", "--no-install-recommends"];
            retry.extend(unpinned.iter().map(String::as_str));
            apt_get(&retry, missing)?;
        }
    }
    if missing.iter().any(|m| matches!(m, Missing::BpfLinker { .. })) {
        let mut cargo = util::cargo();
        // Outside the workspace, so its .cargo/config.toml does not apply to the install.
        cargo
            .current_dir(env::temp_dir())
            .env("PATH", util::path_with(&[PathBuf::from(LLVM_BIN)]))
            .args(bpf_linker_install_args());
        util::heading(&format!("PATH={LLVM_BIN}:$PATH {}", util::display(&cargo)));
        if let Err(e) = util::run(&mut cargo) {
            bail!("{}", instructions(missing, &format!("{e:#}")));
        }
    }
    if missing.contains(&Missing::Nightly) {
        let mut rustup = Command::new("rustup");
        rustup
            .env("PATH", util::child_path())
            .args(nightly_install_args());
        util::heading(&util::display(&rustup));
        if let Err(e) = util::run(&mut rustup) {
            bail!("{}", instructions(missing, &format!("{e:#}")));
        }
    }
    if missing.iter().any(|m| matches!(m, Missing::CargoFuzz { .. })) {
        let mut cargo = util::cargo();
        // Outside the workspace, as for bpf-linker.
        cargo.current_dir(env::temp_dir()).args(cargo_fuzz_install_args());
        util::heading(&util::display(&cargo));
        if let Err(e) = util::run(&mut cargo) {
            bail!("{}", instructions(missing, &format!("{e:#}")));
        }
    }
    Ok(())
}

fn apt_get(args: &[&str], missing: &[Missing]) -> anyhow::Result<()> {
    let mut cmd = Command::new("apt-get");
    cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
    util::heading(&util::display(&cmd));
    util::run(&mut cmd).map_err(|e| anyhow::anyhow!("{}", instructions(missing, &format!("{e:#}"))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inventory(dpkg_output: &str, linker: Option<&str>) -> Inventory {
        Inventory {
            packages: parse_dpkg_query(dpkg_output),
            bpf_linker: linker.map(|out| {
                (
                    PathBuf::from("/root/.cargo/bin/bpf-linker"),
                    parse_tool_version(out, "bpf-linker"),
                )
            }),
            rustup: true,
            nightly: true,
            cargo_fuzz: Some((
                PathBuf::from("/root/.cargo/bin/cargo-fuzz"),
                Some(CARGO_FUZZ_VERSION.into()),
            )),
            rust_web_llvm_major: None,
        }
    }

    #[test]
    fn a_newer_consistent_rust_web_on_llvm_22_is_accepted() {
        let dpkg = "llvm-22-dev\tii \t1:22.1.8\nrustc-web\tii \t1.96.1+dfsg1-1~deb12u1\n\
                    cargo-web\tii \t1.96.1+dfsg1-1~deb12u1\nlibstd-rust-web-dev-bpf\tii \t1.96.1+dfsg1-1~deb12u1\n\
                    iproute2\tii \t6.1\nethtool\tii \t6.1\nxdp-tools\tii \t1.3\ntcpdump\tii \t4.99\n\
                    curl\tii \t7.88\nopenssl\tii \t3.0\npython3\tii \t3.11\nnftables\tii \t1.0.6\n\
                    nghttp2-client\tii \t1.52.0\nnghttp2-server\tii \t1.52.0\nredis-server\tii \t5:7.0.15\n\
                    g++\tii \t4:12.2.0-3\n";
        let mut inv = inventory(dpkg, Some("bpf-linker 0.13.0\n"));
        assert_eq!(
            inv.missing().len(),
            3,
            "not without knowing the LLVM of that rustc"
        );
        inv.rust_web_llvm_major = Some(22);
        assert!(inv.missing().is_empty(), "{:?}", inv.missing());
        inv.rust_web_llvm_major = Some(23);
        assert_eq!(inv.missing().len(), 3, "LLVM 23 needs bpf-linker rebuilt for it");
        assert_eq!(parse_llvm_major("rustc 1.96.0\nLLVM version: 22.1.8\n"), Some(22));
    }

    const ALL_PRESENT: &str = "llvm-22-dev\tii \t1:22.1.8-1~deb12u1\n\
        rustc-web\tii \t1.96.0+dfsg1-1~deb12u2\n\
        cargo-web\tii \t1.96.0+dfsg1-1~deb12u2\n\
        libstd-rust-web-dev-bpf\tii \t1.96.0+dfsg1-1~deb12u2\n\
        iproute2\tii \t6.1.0-3\n\
        ethtool\tii \t1:6.1-1\n\
        xdp-tools\tii \t1.3.1-1\n\
        tcpdump\tii \t4.99.3-1\n\
        curl\tii \t7.88.1-10+deb12u15\n\
        openssl\tii \t3.0.19-1~deb12u2\n\
        python3\tii \t3.11.2-1+b1\n\
        nftables\tii \t1.0.6-2+deb12u2\n\
        nghttp2-client\tii \t1.52.0-1+deb12u2\n\
        nghttp2-server\tii \t1.52.0-1+deb12u2\n\
        redis-server\tii \t5:7.0.15-1~deb12u10\n\
        g++\tii \t4:12.2.0-3\n";

    #[test]
    fn bpf_linker_version_is_parsed() {
        let parse = |out| parse_tool_version(out, "bpf-linker");
        assert_eq!(parse("bpf-linker 0.13.0\n").as_deref(), Some("0.13.0"));
        assert_eq!(parse("\nbpf-linker 0.9.14 \n").as_deref(), Some("0.9.14"));
        assert_eq!(parse("bpf-linker\n"), None);
        assert_eq!(parse("error: unexpected argument\n"), None);
        assert_eq!(parse(""), None);
        assert_eq!(
            parse_tool_version("cargo-fuzz 0.13.2\n", "cargo-fuzz").as_deref(),
            Some("0.13.2")
        );
    }

    #[test]
    fn nightly_is_found_in_rustup_toolchain_list() {
        assert!(has_nightly(
            "stable-x86_64-unknown-linux-gnu (active, default)\nnightly-2026-05-19-x86_64-unknown-linux-gnu\n"
        ));
        // Another nightly is not the pinned one.
        assert!(!has_nightly(
            "nightly-x86_64-unknown-linux-gnu\nnightly-2026-05-01-x86_64-unknown-linux-gnu\n"
        ));
        assert!(!has_nightly(
            "stable-x86_64-unknown-linux-gnu (default)\n1.95.0-x86_64-unknown-linux-gnu\n"
        ));
        assert!(!has_nightly("no installed toolchains\n"));
    }

    #[test]
    fn fuzz_tools_are_installed_with_rustup_and_cargo() {
        let mut inv = inventory(ALL_PRESENT, Some("bpf-linker 0.13.0\n"));
        inv.nightly = false;
        inv.cargo_fuzz = Some((
            PathBuf::from("/root/.cargo/bin/cargo-fuzz"),
            Some("0.12.0".into()),
        ));
        let missing = inv.missing();
        assert_eq!(missing.len(), 2, "{missing:?}");
        assert!(
            missing[1].to_string().contains("is version 0.12.0"),
            "{}",
            missing[1]
        );
        assert_eq!(
            commands(&missing),
            vec![
                format!("rustup toolchain install {NIGHTLY_TOOLCHAIN} --profile minimal --no-self-update"),
                format!("cargo install cargo-fuzz --version {CARGO_FUZZ_VERSION} --locked"),
            ]
        );
        let user = Host {
            root: false,
            apt: false,
            llvm_config: false,
        };
        assert_eq!(cannot_install(&missing, user), None, "neither needs root nor apt");
    }

    #[test]
    fn dpkg_states_are_parsed() {
        let parsed = parse_dpkg_query(
            "rustc-web\tii \t1.96.0+dfsg1-1~deb12u2\nethtool\trc \t1:6.1-1\nxdp-tools\thi \t1.3.1-1\ntcpdump\tun \t\n",
        );
        assert_eq!(
            parsed["rustc-web"],
            DpkgEntry {
                installed: true,
                version: RUST_WEB_VERSION.into()
            }
        );
        assert!(
            !parsed["ethtool"].installed,
            "removed with config files left is not installed"
        );
        assert!(parsed["xdp-tools"].installed, "held packages are installed");
        assert!(!parsed["tcpdump"].installed);
    }

    #[test]
    fn nothing_is_missing_when_all_is_present() {
        assert_eq!(
            inventory(ALL_PRESENT, Some("bpf-linker 0.13.0\n")).missing(),
            vec![]
        );
    }

    #[test]
    fn wrong_rust_version_and_linker_are_reported() {
        let out = ALL_PRESENT.replace(
            "rustc-web\tii \t1.96.0+dfsg1-1~deb12u2",
            "rustc-web\tii \t1.85.0+dfsg3-1~deb12u3",
        );
        let missing = inventory(&out, Some("bpf-linker 0.12.1\n")).missing();
        assert_eq!(missing.len(), 2, "{missing:?}");
        assert!(
            matches!(&missing[0], Missing::Deb { name: "rustc-web", found: Some(v), .. } if v == "1.85.0+dfsg3-1~deb12u3")
        );
        assert!(matches!(&missing[1], Missing::BpfLinker { found: Some((_, Some(v))) } if v == "0.12.1"));
        assert_eq!(
            commands(&missing),
            vec![
                "apt-get update".to_string(),
                format!("apt-get install -y --no-install-recommends rustc-web={RUST_WEB_VERSION}"),
                format!(
                    "PATH=/usr/lib/llvm-22/bin:$PATH cargo install bpf-linker --version {BPF_LINKER_VERSION} \
                     --locked --no-default-features --features llvm-22"
                ),
            ]
        );
    }

    #[test]
    fn fresh_machine_needs_everything_with_exact_pins() {
        let fresh = Inventory {
            rustup: true,
            ..Default::default()
        };
        let missing = fresh.missing();
        assert_eq!(missing.len(), DEB_PACKAGES.len() + 3, "{missing:?}");
        let cmds = commands(&missing);
        assert_eq!(
            cmds[1],
            format!(
                "apt-get install -y --no-install-recommends llvm-22-dev rustc-web={v} cargo-web={v} \
                 libstd-rust-web-dev-bpf={v} iproute2 ethtool xdp-tools tcpdump curl openssl \
                 python3 nftables nghttp2-client nghttp2-server redis-server g++",
                v = RUST_WEB_VERSION
            )
        );
        let text = instructions(&missing, "installing Debian packages needs root");
        assert!(text.contains("needs root"), "{text}");
        assert!(text.contains("bpf-linker 0.13.0"), "{text}");
        assert!(text.contains("    apt-get update\n"), "{text}");
        assert!(text.contains("    cargo install cargo-fuzz --version"), "{text}");
    }

    #[test]
    fn install_is_refused_with_the_reason_before_anything_changes() {
        let fresh = Inventory {
            rustup: true,
            ..Default::default()
        }
        .missing();
        let root_debian = Host {
            root: true,
            apt: true,
            llvm_config: false,
        };
        assert_eq!(
            cannot_install(&fresh, root_debian),
            None,
            "llvm-22-dev comes from apt first"
        );
        let user = Host {
            root: false,
            ..root_debian
        };
        assert!(cannot_install(&fresh, user).unwrap().contains("needs root"));
        let other_distro = Host {
            apt: false,
            ..root_debian
        };
        assert!(
            cannot_install(&fresh, other_distro)
                .unwrap()
                .contains("not a Debian system")
        );

        // Only bpf-linker missing: no root needed (cargo install), but LLVM 22 must be there.
        let linker_only = inventory(ALL_PRESENT, None).missing();
        let user_with_llvm = Host {
            root: false,
            apt: true,
            llvm_config: true,
        };
        assert_eq!(cannot_install(&linker_only, user_with_llvm), None);
        let broken_llvm = Host {
            llvm_config: false,
            ..user_with_llvm
        };
        assert!(
            cannot_install(&linker_only, broken_llvm)
                .unwrap()
                .contains("llvm-config")
        );

        let mut no_rustup = inventory(ALL_PRESENT, Some("bpf-linker 0.13.0"));
        no_rustup.rustup = false;
        let missing = no_rustup.missing();
        assert_eq!(missing, vec![Missing::Rustup]);
        assert!(cannot_install(&missing, root_debian).unwrap().contains("rustup"));
        assert!(commands(&missing)[0].contains("https://rustup.rs"));
    }

    #[test]
    fn bpf_linker_without_version_output_is_missing() {
        let missing = inventory(ALL_PRESENT, Some("")).missing();
        assert!(matches!(
            &missing[..],
            [Missing::BpfLinker {
                found: Some((_, None))
            }]
        ));
        assert!(matches!(
            &inventory(ALL_PRESENT, None).missing()[..],
            [Missing::BpfLinker { found: None }]
        ));
    }
}

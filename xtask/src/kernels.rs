//! `cargo xtask kernels`: the kernel test suite on Debian's 6.1 and 6.12 kernels and on the running kernel.
//!
//! The `aqd-tests` kernel tests ([`KERNEL_TESTS`]) only need `BPF_PROG_TEST_RUN` and root, no network and no
//! disk, so each guest boots from a small initramfs built here: a static busybox, the stripped test binaries
//! with the shared libraries `ldd` names, and an `/init` script that mounts proc, sysfs, devtmpfs, tmpfs and
//! bpffs, runs each binary between `AQD-BEGIN`/`AQD-END` markers and powers off. qemu (KVM) prints the serial
//! console to a log file, which is parsed into the table. Why not virtme-ng: it shares the host's root file
//! system over virtiofs/9p, which Debian's kernels build as modules (`CONFIG_9P_FS=m`, 6.1 also has
//! `CONFIG_VIRTIO_PCI=m`), so it depends on module loading from an initramfs working for each kernel; the
//! tests need nothing but what Debian builds in (BPF, BTF, 8250 console, initramfs), so our own initramfs
//! boots every kernel the same way with no modules at all, in a few seconds.
//!
//! The kernels are Debian packages, downloaded with `apt-get download` and unpacked with `dpkg-deb -x` into
//! `target/xtask-kernels/` rather than installed: installing runs the kernel's postinst hooks (initramfs
//! generation, `/boot` and boot loader updates) on a shared machine for nothing. qemu and busybox are
//! installed with apt-get when missing. None of this is in `bootstrap` (CI never runs this command).
//!
//! The running kernel is booted too when `/boot/vmlinuz-$(uname -r)` is readable; otherwise (a VM whose
//! kernel image is not in its own file system) the tests run directly on the host and the table says so.
//!
//! `--long` sets `AQD_DIFF_PACKETS` to [`LONG_DIFF_PACKETS`] for the differential test. `--kernel` and `--test`
//! narrow the run (one kernel, one test binary) while a change is being worked on; the table then shows only
//! what ran, and the command still exits non-zero on any failure.

use std::{
    collections::BTreeMap,
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Args;

use crate::{bootstrap, util};

/// The kernel test binaries of `aqd-tests` (tests/tests/*.rs), in the order they run.
pub const KERNEL_TESTS: [&str; 6] = [
    "kernel_smoke",
    "kernel_fixtures",
    "kernel_malformed",
    "kernel_fingerprint",
    "kernel_adversarial",
    "kernel_differential",
];
/// Packets of the differential test with `--long` (its default is 100,000).
pub const LONG_DIFF_PACKETS: u64 = 1_000_000;

/// The Debian kernels booted: (label, metapackage that depends on the newest image of that series).
const DEBIAN_KERNELS: [(&str, &str); 2] = [("6.1", "linux-image-amd64"), ("6.12", "linux-image-6.12-amd64")];

#[derive(Args)]
pub struct KernelsArgs {
    /// Run the differential test with 1,000,000 random packets instead of its default.
    #[arg(long)]
    long: bool,
    /// Seconds one kernel may take (boot and all tests) before it counts as failed.
    #[arg(long, default_value_t = 900)]
    timeout: u64,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 2048)]
    memory_mib: u32,
    /// Only these kernels (repeatable): `6.1`, `6.12` or `running`. Default: all three.
    #[arg(long = "kernel", value_parser = ["6.1", "6.12", "running"])]
    kernels: Vec<String>,
    /// Boot the guests under TCG (emulation) at once, without trying KVM first (where KVM cannot boot them,
    /// this saves the KVM attempt's minute per kernel).
    #[arg(long)]
    tcg: bool,
    /// Only these test binaries (repeatable), from the kernel suite. Default: all of it.
    #[arg(long = "test", value_parser = KERNEL_TESTS)]
    tests: Vec<String>,
}

impl KernelsArgs {
    fn wants_kernel(&self, label: &str) -> bool {
        self.kernels.is_empty() || self.kernels.iter().any(|k| k == label)
    }

    /// The test binaries to run, in [`KERNEL_TESTS`] order.
    fn selected_tests(&self) -> Vec<&'static str> {
        KERNEL_TESTS
            .into_iter()
            .filter(|t| self.tests.is_empty() || self.tests.iter().any(|s| s == t))
            .collect()
    }
}

/// One row of the table.
struct Row {
    kernel: String,
    /// Per test binary: its results, when it ran to the end.
    binaries: BTreeMap<String, Binary>,
    /// Why the row failed outside the tests (no boot, timeout, crash), if it did.
    problem: Option<String>,
    /// Printed under the table (e.g. why a kernel ran under TCG).
    note: Option<String>,
    log: PathBuf,
}

#[derive(Clone, Debug, Default, PartialEq)]
struct Binary {
    passed: u32,
    failed: u32,
    exit_code: Option<i32>,
    /// Names of the failed tests.
    failures: Vec<String>,
}

impl Row {
    /// No problem, and every one of `tests` ran to the end without a failure.
    fn ok(&self, tests: &[&str]) -> bool {
        self.problem.is_none()
            && tests.iter().all(|t| {
                self.binaries
                    .get(*t)
                    .is_some_and(|b| b.failed == 0 && b.exit_code == Some(0))
            })
    }
}

/// `cargo xtask kernels [--long] [--timeout S] [--memory-mib M]`.
pub fn run(args: &KernelsArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    util::require_root("`cargo xtask kernels`")?;
    bootstrap::ensure()?;
    ensure_tools(args.tcg)?;
    let selected = args.selected_tests();
    let tests = build_tests(&selected)?;
    let work = util::workspace_root().join("target").join("xtask-kernels");
    fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let env = test_env(args.long);
    let initrd = work.join("initrd.cpio");
    write_initramfs(&initrd, &tests, &env)?;
    let timeout = Duration::from_secs(args.timeout);

    let mut rows = Vec::new();
    for (label, metapackage) in DEBIAN_KERNELS.into_iter().filter(|(l, _)| args.wants_kernel(l)) {
        let log = work.join(format!("debian-{label}.log"));
        let row = match debian_kernel(&work, metapackage) {
            Ok((release, vmlinuz)) => boot(&release, &vmlinuz, &initrd, args, timeout, &log),
            Err(e) => failed_row(format!("Debian {label}"), format!("no kernel image: {e:#}"), log),
        };
        rows.push(row);
    }
    if args.wants_kernel("running") {
        rows.push(running_kernel(&work, &initrd, &tests, &env, args, timeout)?);
    }

    print_table(&rows, &selected);
    for note in rows.iter().filter_map(|r| r.note.as_ref()) {
        println!("note: {note}");
    }
    let failed: Vec<&Row> = rows.iter().filter(|r| !r.ok(&selected)).collect();
    for row in &failed {
        println!(
            "{}: failed; serial console / output in {}",
            row.kernel,
            row.log.display()
        );
    }
    println!("xtask kernels: {:.0} s", started.elapsed().as_secs_f64());
    if !failed.is_empty() {
        bail!("{} of {} kernels failed", failed.len(), rows.len());
    }
    Ok(())
}

/// The running kernel's row: booted under qemu when its image is readable, else the tests on the host.
fn running_kernel(
    work: &Path,
    initrd: &Path,
    tests: &[(String, PathBuf)],
    env: &[(String, String)],
    args: &KernelsArgs,
    timeout: Duration,
) -> anyhow::Result<Row> {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease")
        .context("reading /proc/sys/kernel/osrelease")?
        .trim()
        .to_string();
    let vmlinuz = PathBuf::from(format!("/boot/vmlinuz-{release}"));
    let log = work.join("running.log");
    if fs::File::open(&vmlinuz).is_ok() {
        return Ok(boot(&release, &vmlinuz, initrd, args, timeout, &log));
    }
    let mut row = on_host(&format!("{release} (host)"), tests, env, timeout, &log)?;
    row.note = Some(format!(
        "{release}: {} is not readable, so its tests ran on the host, not in a VM",
        vmlinuz.display()
    ));
    Ok(row)
}

/// Environment of every test binary (guest and host).
fn test_env(long: bool) -> Vec<(String, String)> {
    let mut env = vec![("RUST_BACKTRACE".to_string(), "1".to_string())];
    if long {
        env.push(("AQD_DIFF_PACKETS".to_string(), LONG_DIFF_PACKETS.to_string()));
    }
    env
}

/// Installs qemu and busybox with apt-get when missing.
fn ensure_tools(tcg: bool) -> anyhow::Result<()> {
    let mut missing = Vec::new();
    if !tcg && !Path::new("/dev/kvm").exists() {
        bail!(
            "/dev/kvm is missing: the guests need KVM (nested virtualisation on for this VM), or pass --tcg"
        );
    }
    if util::find_in_path(
        "qemu-system-x86_64",
        &std::env::var_os("PATH").unwrap_or_default(),
    )
    .is_none()
    {
        missing.push("qemu-system-x86");
    }
    if !Path::new("/bin/busybox").exists() {
        missing.push("busybox-static");
    }
    if !missing.is_empty() {
        apt_get_install(&missing)?;
    }
    Ok(())
}

/// `apt-get install -y --no-install-recommends PACKAGES`, after an `apt-get update` if the first try fails.
fn apt_get_install(packages: &[&str]) -> anyhow::Result<()> {
    let install = || {
        let mut cmd = Command::new("apt-get");
        cmd.args(["install", "-y", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive");
        util::heading(&util::display(&cmd));
        util::run(&mut cmd)
    };
    if install().is_err() {
        util::run(Command::new("apt-get").arg("update"))?;
        install()?;
    }
    Ok(())
}

/// Builds the `selected` kernel test binaries on the host; returns (name, path) in that order.
fn build_tests(selected: &[&str]) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let mut args = vec!["-p", "aqd-tests", "--no-run"];
    for test in selected {
        args.extend(["--test", test]);
    }
    let built = util::cargo_executables("test", &args)?;
    selected
        .iter()
        .map(|name| Ok((name.to_string(), util::find_binary(&built, name)?)))
        .collect()
}

/// The newest image `metapackage` depends on, unpacked under `work`: (release, vmlinuz path).
fn debian_kernel(work: &Path, metapackage: &str) -> anyhow::Result<(String, PathBuf)> {
    let out = Command::new("apt-cache")
        .args(["depends", "--no-recommends", "--no-suggests", metapackage])
        .output()
        .context("running apt-cache")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let package = image_dependency(&text)
        .with_context(|| format!("`apt-cache depends {metapackage}` names no linux-image package"))?;
    let release = package.trim_start_matches("linux-image-").to_string();
    let root = work.join(&package);
    let vmlinuz = root.join("boot").join(format!("vmlinuz-{release}"));
    if vmlinuz.exists() {
        return Ok((release, vmlinuz));
    }
    let debs = work.join("debs");
    fs::create_dir_all(&debs)?;
    let download = || {
        let mut cmd = Command::new("apt-get");
        cmd.args(["download", &package]).current_dir(&debs);
        util::heading(&util::display(&cmd));
        util::run(&mut cmd)
    };
    if download().is_err() {
        util::run(Command::new("apt-get").arg("update"))?;
        download()?;
    }
    let deb = fs::read_dir(&debs)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{package}_")) && n.ends_with(".deb"))
        })
        .with_context(|| format!("apt-get download left no {package}_*.deb in {}", debs.display()))?;
    let mut unpack = Command::new("dpkg-deb");
    unpack.arg("-x").arg(&deb).arg(&root);
    util::heading(&util::display(&unpack));
    util::run(&mut unpack)?;
    if !vmlinuz.exists() {
        bail!("{} holds no {}", deb.display(), vmlinuz.display());
    }
    Ok((release, vmlinuz))
}

/// The `linux-image-*` package in `apt-cache depends` output (`  Depends: linux-image-6.1.0-57-amd64`).
fn image_dependency(apt_cache_depends: &str) -> Option<String> {
    apt_cache_depends.lines().find_map(|line| {
        let dep = line.trim().strip_prefix("Depends:")?.trim();
        dep.starts_with("linux-image-").then(|| dep.to_string())
    })
}

/// The guest's `/init`: mounts, runs each test binary between markers, powers off.
fn init_script(tests: &[(String, PathBuf)], env: &[(String, String)]) -> String {
    let mut s = String::from(
        "#!/bin/busybox sh\n\
         /bin/busybox --install -s /bin\n\
         export PATH=/bin HOME=/tmp\n\
         mkdir -p /proc /sys /dev /tmp /run\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sysfs /sys\n\
         mount -t devtmpfs devtmpfs /dev\n\
         mkdir -p /dev/shm && mount -t tmpfs shm /dev/shm\n\
         mount -t tmpfs tmp /tmp\n\
         mount -t bpf bpf /sys/fs/bpf\n\
         ip link set lo up\n",
    );
    for (key, value) in env {
        s.push_str(&format!("export {key}={value}\n"));
    }
    s.push_str("echo \"AQD-KERNEL $(uname -r)\"\n");
    for (name, _) in tests {
        s.push_str(&format!(
            "echo AQD-BEGIN {name}\n/tests/{name} --test-threads=2\necho \"AQD-END {name} $?\"\n"
        ));
    }
    s.push_str("echo AQD-DONE\npoweroff -f\n");
    s
}

/// Writes the guest's initramfs (an uncompressed cpio, which every kernel unpacks).
fn write_initramfs(path: &Path, tests: &[(String, PathBuf)], env: &[(String, String)]) -> anyhow::Result<()> {
    util::heading(&format!("initramfs {}", path.display()));
    let mut cpio = Cpio::default();
    for dir in ["bin", "tests", "proc", "sys", "dev", "tmp", "run"] {
        cpio.dir(dir);
    }
    cpio.file("init", init_script(tests, env).as_bytes(), 0o755);
    let busybox = fs::read("/bin/busybox").context("reading /bin/busybox")?;
    cpio.file("bin/busybox", &busybox, 0o755);
    let mut libraries = shared_libraries(Path::new("/bin/busybox"))?;
    for (name, binary) in tests {
        cpio.file(&format!("tests/{name}"), &stripped(binary)?, 0o755);
        libraries.extend(shared_libraries(binary)?);
    }
    libraries.sort();
    libraries.dedup();
    for library in &libraries {
        let bytes = fs::read(library).with_context(|| format!("reading {}", library.display()))?;
        cpio.file_at(library, &bytes, 0o755);
    }
    // kernel_fingerprint reads the public test data at `tests/../../shared/testdata` (a path resolved from
    // the tests crate's directory, so that directory must exist too): both at the host's paths.
    let tests_crate = util::workspace_root().join("tests");
    cpio.dir_at(&tests_crate);
    let testdata = tests_crate.join("../../shared/testdata");
    if let Ok(testdata) = testdata.canonicalize() {
        add_tree(&mut cpio, &testdata)?;
    }
    fs::write(path, cpio.finish()).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// The files under `dir`, recursively, at their host paths.
fn add_tree(cpio: &mut Cpio, dir: &Path) -> anyhow::Result<()> {
    cpio.dir_at(dir);
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            add_tree(cpio, &path)?;
        } else if path.is_file() {
            let bytes = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            cpio.file_at(&path, &bytes, 0o644);
        }
    }
    Ok(())
}

/// `binary` without debug info (`strip --strip-debug`; the binary itself when strip is missing): the debug
/// build's test binaries are mostly DWARF.
fn stripped(binary: &Path) -> anyhow::Result<Vec<u8>> {
    let out = std::env::temp_dir().join(format!("aqd-xtask-strip-{}", std::process::id()));
    let status = Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(&out)
        .arg(binary)
        .status();
    let bytes = match status {
        Ok(s) if s.success() => fs::read(&out)?,
        _ => fs::read(binary).with_context(|| format!("reading {}", binary.display()))?,
    };
    let _ = fs::remove_file(&out);
    Ok(bytes)
}

/// The shared libraries (and the dynamic loader) `ldd` lists for `binary`; none for a static binary.
fn shared_libraries(binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(binary).output().context("running ldd")?;
    Ok(ldd_paths(&String::from_utf8_lossy(&out.stdout)))
}

/// Absolute paths in `ldd` output: `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` and
/// `/lib64/ld-linux-x86-64.so.2 (0x...)`; `linux-vdso.so.1 (0x...)` has none.
fn ldd_paths(ldd: &str) -> Vec<PathBuf> {
    ldd.lines()
        .filter_map(|line| {
            let path = line.split("=>").last()?.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// A cpio archive in the "newc" format the kernel's initramfs unpacker reads.
#[derive(Default)]
struct Cpio {
    bytes: Vec<u8>,
    inode: u32,
    dirs: Vec<String>,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.inode += 1;
        let header = format!(
            "070701{:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.inode,
            0, // uid
            0, // gid
            1, // nlink
            0, // mtime
            data.len(),
            0, // dev major
            0, // dev minor
            0, // rdev major
            0, // rdev minor
            name.len() + 1,
            0, // check
        );
        self.bytes.extend_from_slice(header.as_bytes());
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(0);
        self.pad();
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.bytes.len().is_multiple_of(4) {
            self.bytes.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        if !self.dirs.iter().any(|d| d == name) {
            self.dirs.push(name.to_string());
            self.entry(name, 0o040_755, &[]);
        }
    }

    fn file(&mut self, name: &str, data: &[u8], permissions: u32) {
        self.entry(name, 0o100_000 | permissions, data);
    }

    /// Directory `path` (absolute, as on the host) and its ancestors.
    fn dir_at(&mut self, path: &Path) {
        let relative = path.strip_prefix("/").unwrap_or(path);
        for ancestor in relative.ancestors().collect::<Vec<_>>().into_iter().rev() {
            if !ancestor.as_os_str().is_empty() {
                self.dir(&ancestor.to_string_lossy());
            }
        }
    }

    /// File `path` (absolute, as on the host), after its directories.
    fn file_at(&mut self, path: &Path, data: &[u8], permissions: u32) {
        if let Some(parent) = path.parent() {
            self.dir_at(parent);
        }
        let relative = path.strip_prefix("/").unwrap_or(path);
        self.file(&relative.to_string_lossy(), data, permissions);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.bytes
    }
}

/// How long a guest may take to reach `/init` before its accelerator counts as not working.
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

/// Boots `vmlinuz` with the test initramfs under qemu and parses its serial console. KVM first; when the guest
/// does not reach `/init` under KVM (measured on this Firecracker VM's nested KVM: Debian's kernels stop in
/// the boot decompressor with "KVM internal error. Suberror: 1", an instruction KVM could not emulate), the
/// same boot again under TCG (emulation, slower), and the row says so.
fn boot(
    release: &str,
    vmlinuz: &Path,
    initrd: &Path,
    args: &KernelsArgs,
    timeout: Duration,
    log: &Path,
) -> Row {
    let mut kvm_problem = None;
    let accels: &[&str] = if args.tcg { &["tcg"] } else { &["kvm", "tcg"] };
    for accel in accels.iter().copied() {
        util::heading(&format!(
            "booting {release} under {accel} (serial console: {})",
            log.display()
        ));
        let console = match fs::File::create(log) {
            Ok(f) => f,
            Err(e) => {
                return failed_row(
                    release.to_string(),
                    format!("cannot create {}: {e}", log.display()),
                    log.into(),
                );
            }
        };
        let mut qemu = Command::new("qemu-system-x86_64");
        qemu.args(["-accel", accel, "-cpu"])
            // -cpu host fails on this nested KVM (cannot set MSR 0x10a, IA32_ARCH_CAPABILITIES).
            .arg(if accel == "kvm" {
                "host,-arch-capabilities"
            } else {
                "max"
            })
            .args(["-smp", "2", "-m"])
            .arg(args.memory_mib.to_string())
            .args([
                "-nodefaults",
                "-no-reboot",
                "-display",
                "none",
                "-serial",
                "stdio",
                "-kernel",
            ])
            .arg(vmlinuz)
            .arg("-initrd")
            .arg(initrd)
            // panic=-1: a kernel panic reboots at once, and -no-reboot turns that into qemu exiting.
            .args(["-append", "console=ttyS0 panic=-1 loglevel=4 rdinit=/init"])
            .stdin(Stdio::null())
            .stdout(console)
            .stderr(Stdio::piped());
        let booted = || {
            let text = fs::read_to_string(log).unwrap_or_default();
            text.contains("AQD-KERNEL") || text.contains("Kernel panic")
        };
        let outcome = run_bounded(&mut qemu, timeout, Some((BOOT_TIMEOUT, &booted)));
        let text = fs::read_to_string(log).unwrap_or_default();
        if accel == "kvm" && !text.contains("AQD-KERNEL") {
            let why = match &outcome {
                Err(e) => format!("{e:#}"),
                Ok(()) => "qemu exited before /init ran".to_string(),
            };
            let internal = text.lines().find(|l| l.contains("KVM internal error"));
            let why = internal.map_or(why, |l| l.trim().to_string());
            println!("{release}: no boot under KVM ({why}); retrying under TCG");
            kvm_problem = Some(why);
            continue;
        }
        let label = if accel == "tcg" {
            format!("{release} (tcg)")
        } else {
            release.to_string()
        };
        let mut row = parse_transcript(&label, &text, log);
        if let Err(e) = outcome {
            row.problem = Some(first_line(&format!("{e:#}")));
        }
        row.note = kvm_problem.map(|why| format!("{release} ran under TCG: under KVM, {why}"));
        return row;
    }
    unreachable!("the TCG attempt always returns")
}

fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or_default().to_string()
}

/// Runs `cmd` to completion or kills it after `timeout`; an error says which, with its stderr. With
/// `started = (limit, check)`, also kills it when `check` is still false after `limit`.
fn run_bounded(
    cmd: &mut Command,
    timeout: Duration,
    started: Option<(Duration, &dyn Fn() -> bool)>,
) -> anyhow::Result<()> {
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot run `{}`", util::display(cmd)))?;
    let begin = Instant::now();
    let mut seen_start = started.is_none();
    loop {
        if let Some(status) = child.try_wait()? {
            let mut stderr = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
            }
            if !status.success() {
                let program = Path::new(cmd.get_program())
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy();
                bail!("{program} exited with {status}: {}", stderr.trim());
            }
            return Ok(());
        }
        if let Some((limit, check)) = started
            && !seen_start
        {
            seen_start = check();
            if !seen_start && begin.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                bail!("not started after {} s", limit.as_secs());
            }
        }
        if begin.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            bail!("timed out after {} s", timeout.as_secs());
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// The running kernel without a VM: the same binaries, markers written into the same kind of transcript.
fn on_host(
    label: &str,
    tests: &[(String, PathBuf)],
    env: &[(String, String)],
    timeout: Duration,
    log: &Path,
) -> anyhow::Result<Row> {
    util::heading(&format!(
        "running the kernel tests on the host (output: {})",
        log.display()
    ));
    let mut transcript = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let deadline = Instant::now() + timeout;
    for (name, binary) in tests {
        writeln!(transcript, "AQD-BEGIN {name}")?;
        let mut cmd = Command::new(binary);
        cmd.arg("--test-threads=2")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(transcript.try_clone()?)
            .stderr(transcript.try_clone()?);
        let code = match run_bounded(&mut cmd, deadline.saturating_duration_since(Instant::now()), None) {
            Ok(()) => 0,
            Err(_) => 1,
        };
        writeln!(transcript, "AQD-END {name} {code}")?;
    }
    writeln!(transcript, "AQD-DONE")?;
    let text = fs::read_to_string(log)?;
    Ok(parse_transcript(label, &text, log))
}

fn failed_row(kernel: String, problem: String, log: PathBuf) -> Row {
    Row {
        kernel,
        binaries: BTreeMap::new(),
        problem: Some(problem),
        note: None,
        log,
    }
}

/// Reads a transcript (serial console or host output): the markers of [`init_script`] and libtest's
/// `test result:` and `test NAME ... FAILED` lines.
fn parse_transcript(label: &str, text: &str, log: &Path) -> Row {
    let mut row = failed_row(label.to_string(), String::new(), log.to_path_buf());
    row.problem = None;
    let mut current: Option<(String, Binary)> = None;
    let mut done = false;
    let mut last_kernel_line = String::new();
    for line in text.lines().map(|l| l.trim_end_matches('\r')) {
        if let Some(name) = line.strip_prefix("AQD-BEGIN ") {
            current = Some((name.trim().to_string(), Binary::default()));
        } else if let Some(rest) = line.strip_prefix("AQD-END ") {
            let mut parts = rest.split_whitespace();
            if let (Some(name), Some((_, mut binary))) = (parts.next(), current.take()) {
                binary.exit_code = parts.next().and_then(|c| c.parse().ok());
                row.binaries.insert(name.to_string(), binary);
            }
        } else if line.starts_with("AQD-DONE") {
            done = true;
        } else if let Some((_, binary)) = current.as_mut() {
            if let Some((passed, failed)) = test_result(line) {
                binary.passed += passed;
                binary.failed += failed;
            } else if let Some(test) = line
                .strip_prefix("test ")
                .and_then(|l| l.strip_suffix(" ... FAILED"))
            {
                binary.failures.push(test.to_string());
            }
        }
        if line.contains("Kernel panic") || line.contains("BUG:") {
            last_kernel_line = line.to_string();
        }
    }
    if !done {
        row.problem = Some(match (current, last_kernel_line.is_empty()) {
            (Some((name, _)), true) => format!("the guest stopped while {name} ran"),
            (Some((name, _)), false) => format!("while {name} ran: {last_kernel_line}"),
            (None, false) => last_kernel_line,
            (None, true) => "the guest did not finish the suite (no AQD-DONE on the console)".to_string(),
        });
    }
    row
}

/// `(passed, failed)` from libtest's `test result: ok. 12 passed; 0 failed; 0 ignored; ...`.
fn test_result(line: &str) -> Option<(u32, u32)> {
    let rest = line.trim().strip_prefix("test result: ")?;
    let count = |what: &str| -> Option<u32> {
        let before = rest.split(&format!(" {what}")).next()?;
        before.rsplit([' ', '.', ';']).next()?.parse().ok()
    };
    Some((count("passed")?, count("failed")?))
}

fn print_table(rows: &[Row], tests: &[&str]) {
    let mut header = vec!["kernel".to_string()];
    header.extend(tests.iter().map(|t| t.trim_start_matches("kernel_").to_string()));
    header.push("result".to_string());
    let mut lines = vec![header];
    for row in rows {
        let mut cells = vec![row.kernel.clone()];
        for test in tests {
            cells.push(match row.binaries.get(*test) {
                Some(b) if b.exit_code == Some(0) || b.passed + b.failed > 0 => {
                    format!("{}/{}", b.passed, b.failed)
                }
                Some(b) => format!("exit {}", b.exit_code.map_or("?".into(), |c| c.to_string())),
                None => "-".to_string(),
            });
        }
        cells.push(if row.ok(tests) {
            "PASS".to_string()
        } else {
            let mut why = Vec::new();
            if let Some(problem) = &row.problem {
                why.push(problem.clone());
            }
            for (name, b) in &row.binaries {
                if !b.failures.is_empty() {
                    why.push(format!("{name}: {}", b.failures.join(", ")));
                } else if b.exit_code != Some(0) {
                    why.push(format!("{name} exited {:?}", b.exit_code));
                }
            }
            format!("FAIL ({})", why.join("; "))
        });
        lines.push(cells);
    }
    let widths: Vec<usize> = (0..lines[0].len())
        .map(|i| lines.iter().map(|l| l[i].len()).max().unwrap_or(0))
        .collect();
    println!("\npassed/failed per test binary:");
    for (n, line) in lines.iter().enumerate() {
        let cells: Vec<String> = line
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (c, w))| {
                if i + 1 == line.len() {
                    c.clone()
                } else {
                    format!("{c:<w$}")
                }
            })
            .collect();
        println!("| {} |", cells.join(" | "));
        if n == 0 {
            let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
            println!("|-{}-|", rule.join("-|-"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libtest_summaries_are_counted() {
        assert_eq!(
            test_result(
                "test result: ok. 12 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.2s"
            ),
            Some((12, 0))
        );
        assert_eq!(
            test_result("test result: FAILED. 3 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out"),
            Some((3, 2))
        );
        assert_eq!(test_result("running 5 tests"), None);
    }

    #[test]
    fn transcripts_give_rows() {
        let text = "noise\r\nAQD-BEGIN kernel_smoke\r\ntest a ... ok\r\ntest b ... FAILED\r\n\
                    test result: FAILED. 1 passed; 1 failed; 0 ignored\r\nAQD-END kernel_smoke 101\r\n\
                    AQD-BEGIN kernel_fixtures\r\n[  3.1] Kernel panic - not syncing: oops\r\n";
        let row = parse_transcript("6.1", text, Path::new("/l"));
        let smoke = &row.binaries["kernel_smoke"];
        assert_eq!((smoke.passed, smoke.failed, smoke.exit_code), (1, 1, Some(101)));
        assert_eq!(smoke.failures, ["b"]);
        assert!(
            row.problem
                .as_deref()
                .unwrap()
                .contains("while kernel_fixtures ran: [  3.1] Kernel panic")
        );
        assert!(!row.ok(&KERNEL_TESTS));
        assert!(!row.ok(&["kernel_smoke"]));
    }

    #[test]
    fn apt_and_ldd_output_is_read() {
        let depends = "linux-image-amd64\n  Depends: linux-image-6.1.0-57-amd64\n";
        assert_eq!(
            image_dependency(depends).as_deref(),
            Some("linux-image-6.1.0-57-amd64")
        );
        let ldd = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x7f)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x7f)\n";
        assert_eq!(
            ldd_paths(ldd),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
    }

    #[test]
    fn cpio_entries_are_aligned_and_terminated() {
        let mut cpio = Cpio::default();
        cpio.dir("bin");
        cpio.dir("bin");
        cpio.file("init", b"#!/bin/sh\n", 0o755);
        let bytes = cpio.finish();
        assert_eq!(bytes.len() % 4, 0);
        assert!(bytes.starts_with(b"070701"));
        assert_eq!(bytes.windows(6).filter(|w| w == b"070701").count(), 3);
        assert!(bytes.windows(10).any(|w| w == b"TRAILER!!!"));
    }
}

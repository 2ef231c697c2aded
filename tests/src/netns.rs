//! A two-namespace lab for end-to-end tests: a client and a server network namespace joined by a veth pair,
//! a private bpffs, the `aqd` daemon and CLI run in the server namespace, and bounded UDP/TCP traffic between
//! the two namespaces.
//!
//! ```text
//!  netns aqdt-<pid>-<n>-c                         netns aqdt-<pid>-<n>-s
//!  ┌───────────────────────────┐  veth  ┌──────────────────────────────┐
//!  │ aqd-c0 10.A.B.1, 10.A.B.3 ├────────┤ aqd-s0 10.A.B.2  ← aqd (XDP) │
//!  │        fd61:7164:P:N::1   │        │        fd61:7164:P:N::2      │
//!  └───────────────────────────┘        └──────────────────────────────┘
//!  bpffs mounted at <tmp>/aqdt-<pid>-<n>/bpffs (outside /sys, so it is visible inside `ip netns exec`)
//! ```
//!
//! Invariants:
//! - every name (namespaces, temp dir) contains the test process's pid and a per-process counter, and the veth
//!   is created directly inside the namespaces, so labs never collide, in one test binary or across binaries;
//! - all traffic stays between the two namespaces; neighbours are static (no ARP/ND), so what the receiver counts
//!   depends only on what XDP does;
//! - [`Lab`]'s `Drop` stops the daemon it started, deletes both namespaces, unmounts the bpffs, removes the temp
//!   directory, and then checks that all of that really happened (it panics if not, unless already panicking);
//! - traffic code enters a namespace with `setns(2)` on a fresh thread per operation (a thread that entered a
//!   namespace stays there, so it is never reused). Sockets keep the namespace they were created in, so a socket
//!   made on such a thread can be used from any thread afterwards.
//!
//! Needs root (CAP_SYS_ADMIN for namespaces and mounts, CAP_BPF/CAP_NET_ADMIN for aqd): see [`unavailable`].

use std::{
    fs::{self, File},
    io::{self, Read as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::{
        fd::AsRawFd as _,
        unix::{fs::MetadataExt as _, process::CommandExt as _},
    },
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Once,
        atomic::{AtomicU32, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail, ensure};
use detector_user::{
    control::views::{KernelStatus, ListView, StatusView},
    maps::DecisionRow,
};
use serde_json::Value;

/// Prefix of every lab's namespaces and temp directory.
const PREFIX: &str = "aqdt";
/// Where `ip netns` keeps its namespace handles.
const NETNS_DIR: &str = "/var/run/netns";
/// The client's veth end (inside the client namespace).
pub const CLIENT_IF: &str = "aqd-c0";
/// The server's veth end (inside the server namespace); aqd attaches here.
pub const SERVER_IF: &str = "aqd-s0";
const CLIENT_MAC: &str = "02:61:71:64:00:01";
const SERVER_MAC: &str = "02:61:71:64:00:02";
/// The port the daemon protects (`--protected-ports`) and the probes send to.
pub const SERVICE_PORT: u16 = 8443;
/// How long a command of the aqd CLI (or `ip`) may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `aqd run` may take to load and attach.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(15);
/// How long `aqd run` may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

/// Why these tests cannot run here, if they cannot (they need root).
pub fn unavailable() -> Option<&'static str> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (network namespaces, bpffs, XDP)");
    }
    None
}

/// A fresh lab for a test, or `None` (skipped, see [`crate::skip_or_fail`]) where labs cannot be built.
pub fn lab_for_test() -> Option<Lab> {
    lab_with_queues_for_test(1)
}

/// [`lab_for_test`] with `queues` receive and transmit queues on each end of the veth pair.
pub fn lab_with_queues_for_test(queues: u16) -> Option<Lab> {
    if let Some(why) = unavailable() {
        crate::skip_or_fail(why);
        return None;
    }
    Some(Lab::with_queues(queues).expect("building the lab"))
}

/// The `aqd` binary: `$AQD_BIN`, else `<workspace>/target/debug/aqd`.
pub fn aqd_bin() -> anyhow::Result<PathBuf> {
    let path = match std::env::var_os("AQD_BIN") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/aqd"),
    };
    ensure!(
        path.is_file(),
        "aqd binary not found at {}: run `cargo build -p detector-user` first (`cargo xtask test` does), or set \
         AQD_BIN",
        path.display()
    );
    Ok(path)
}

/// `$AQD_BIN`, else the release `aqd` next to this bench's profile directory, built (or found up to date) by
/// `cargo build --release -p detector-user`.
pub fn release_aqd() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("AQD_BIN") {
        let path = PathBuf::from(path);
        ensure!(path.is_file(), "AQD_BIN={} is not a file", path.display());
        return Ok(path);
    }
    // A bench runs from <target>/release/deps/<bench>-<hash>; `cargo build --release` (same CARGO_TARGET_DIR,
    // inherited) puts aqd into <target>/release.
    let exe = std::env::current_exe().context("locating the bench executable")?;
    let release = exe
        .parent()
        .and_then(Path::parent)
        .filter(|d| d.file_name().is_some_and(|n| n == "release"))
        .map(Path::to_path_buf)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release"));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    eprintln!("building the release aqd: cargo build --release -p detector-user --bin aqd");
    let status = Command::new(cargo)
        .args(["build", "--release", "-p", "detector-user", "--bin", "aqd"])
        .current_dir(&workspace)
        .stdin(Stdio::null())
        .status()
        .context("running cargo build --release -p detector-user")?;
    ensure!(
        status.success(),
        "cargo build --release -p detector-user failed ({status})"
    );
    let aqd = release.join("aqd");
    ensure!(aqd.is_file(), "no aqd at {} after the build", aqd.display());
    Ok(aqd)
}

/// Address family of a probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

// ---------------------------------------------------------------------------------------------------------------
// Namespaces
// ---------------------------------------------------------------------------------------------------------------

/// A named network namespace (`ip netns`). Only a handle: [`Lab`] creates and deletes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Netns {
    name: String,
}

/// Work running on a thread inside a namespace.
pub struct NsTask<T> {
    namespace: String,
    handle: JoinHandle<io::Result<T>>,
}

impl<T> NsTask<T> {
    /// Waits for the work; a panic on the thread becomes an error.
    pub fn join(self) -> io::Result<T> {
        self.handle
            .join()
            .map_err(|_| io::Error::other(format!("a thread in netns {} panicked", self.namespace)))?
    }
}

impl Netns {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The handle `ip netns add` made (`/var/run/netns/<name>`).
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    /// A command run inside this namespace (`ip netns exec <name> <program>`). `ip` execs the program, so the
    /// child's pid is the program's.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs `f` on a fresh thread that entered this namespace, and waits for it.
    pub fn run<T, F>(&self, f: F) -> io::Result<T>
    where
        F: FnOnce() -> io::Result<T> + Send + 'static,
        T: Send + 'static,
    {
        self.spawn(f).join()
    }

    /// Starts `f` on a fresh thread that entered this namespace (the thread ends with `f`).
    pub fn spawn<T, F>(&self, f: F) -> NsTask<T>
    where
        F: FnOnce() -> io::Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let path = self.path();
        let handle = thread::Builder::new()
            .name(format!("in-{}", self.name))
            .spawn(move || {
                enter(&path)?;
                f()
            })
            .expect("spawning a thread");
        NsTask {
            namespace: self.name.clone(),
            handle,
        }
    }
}

/// Moves the calling thread into the network namespace at `path`, and checks that it got there.
fn enter(path: &Path) -> io::Result<()> {
    let file = File::open(path).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    // SAFETY: a valid namespace fd; CLONE_NEWNET only changes this thread's network namespace.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("setns({}): {e}", path.display()),
        ));
    }
    let here = fs::metadata("/proc/thread-self/ns/net")?;
    let target = file.metadata()?;
    if (here.dev(), here.ino()) != (target.dev(), target.ino()) {
        return Err(io::Error::other(format!(
            "setns({}) returned but the thread is not in that namespace",
            path.display()
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------------------------------------------

/// What a finished command printed and how it exited.
#[derive(Clone, Debug)]
pub struct CmdOutput {
    /// What ran (for messages).
    pub what: String,
    /// Exit code; `None` when killed by a signal.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CmdOutput {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// `Ok(self)` if the command exited 0, else an error with its output.
    pub fn ok(self) -> anyhow::Result<Self> {
        ensure!(self.success(), "{self}");
        Ok(self)
    }

    /// stdout parsed as JSON.
    pub fn json(&self) -> anyhow::Result<Value> {
        serde_json::from_str(&self.stdout).with_context(|| format!("{} printed no JSON: {self}", self.what))
    }

    /// stdout parsed as one of the control protocol's typed views (`--json` prints them as they travel).
    pub fn view<T: serde::de::DeserializeOwned>(&self) -> anyhow::Result<T> {
        serde_json::from_str(&self.stdout).with_context(|| {
            format!(
                "{} printed no {} view: {self}",
                self.what,
                std::any::type_name::<T>()
            )
        })
    }
}

impl std::fmt::Display for CmdOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`{}` exited with {:?}\n--- stdout\n{}--- stderr\n{}",
            self.what, self.code, self.stdout, self.stderr
        )
    }
}

/// Runs `cmd` to completion (killing it after `timeout`) and captures its output.
pub fn run_bounded(mut cmd: Command, timeout: Duration) -> anyhow::Result<CmdOutput> {
    let what = describe(&cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning `{what}`"))?;
    let read = |pipe: Option<Box<dyn io::Read + Send>>| {
        thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_string(&mut text);
            }
            text
        })
    };
    let out = read(child.stdout.take().map(|p| Box::new(p) as _));
    let err = read(child.stderr.take().map(|p| Box::new(p) as _));
    let status = match wait_timeout(&mut child, timeout)? {
        Some(status) => status,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            bail!("`{what}` did not finish within {timeout:?}");
        }
    };
    Ok(CmdOutput {
        what,
        code: status.code(),
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Waits up to `timeout` for `child`; `None` if it is still running.
fn wait_timeout(child: &mut Child, timeout: Duration) -> io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Runs `ip <args>` and fails with its stderr unless it succeeds.
fn ip(args: &[&str]) -> anyhow::Result<()> {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    run_bounded(cmd, COMMAND_TIMEOUT)?.ok()?;
    Ok(())
}

/// Runs `ip -n <ns> <args>`; `args` is split on whitespace (none of the lab's arguments contain any).
fn ip_in(ns: &Netns, args: &str) -> anyhow::Result<()> {
    let mut all = vec!["-n", ns.name()];
    all.extend(args.split_whitespace());
    ip(&all)
}

// ---------------------------------------------------------------------------------------------------------------
// The lab
// ---------------------------------------------------------------------------------------------------------------

/// A running `aqd run` started by a [`Lab`].
#[derive(Debug)]
struct Daemon {
    child: Child,
}

/// Two namespaces, a veth pair, a private bpffs and (optionally) an aqd daemon. Torn down and checked on drop.
#[derive(Debug)]
pub struct Lab {
    id: String,
    pub client: Netns,
    pub server: Netns,
    /// The client's first (primary) IPv4 address; TCP probes use it.
    pub client_v4: Ipv4Addr,
    /// A second IPv4 address of the client, for a second traffic source.
    pub client_v4_alt: Ipv4Addr,
    pub server_v4: Ipv4Addr,
    pub client_v6: Ipv6Addr,
    pub server_v6: Ipv6Addr,
    aqd: PathBuf,
    dir: PathBuf,
    bpffs: PathBuf,
    // What exists, so that a half-built lab is torn down too.
    dir_created: bool,
    mounted: bool,
    namespaces: Vec<Netns>,
    daemon: Option<Daemon>,
    daemons_started: u32,
}

impl Lab {
    /// Builds a fresh lab. Fails (after cleaning up what it made) if any step fails.
    pub fn new() -> anyhow::Result<Self> {
        Self::with_queues(1)
    }

    /// [`Self::new`] with `queues` receive and transmit queues on each end of the veth pair (`numrxqueues`,
    /// `numtxqueues`): frames the client sends on its transmit queue N arrive on the server's receive queue N,
    /// whose NAPI instance runs the XDP program (native mode).
    pub fn with_queues(queues: u16) -> anyhow::Result<Self> {
        ensure!(queues >= 1, "a veth needs at least one queue, not {queues}");
        reap_stale_labs();
        let aqd = aqd_bin()?;
        let pid = std::process::id();
        let n = NEXT_LAB.fetch_add(1, Ordering::Relaxed);
        let id = format!("{PREFIX}-{pid}-{n}");
        // Unique per lab within this process (and usually across processes); the namespaces isolate them anyway.
        let (a, b) = (200 + (pid % 56) as u8, (n % 256) as u8);
        let (p16, n16) = ((pid & 0xffff) as u16, (n & 0xffff) as u16);
        let v6 = |host: u16| Ipv6Addr::new(0xfd61, 0x7164, p16, n16, 0, 0, 0, host);
        let dir = std::env::temp_dir().join(&id);
        let mut lab = Self {
            client: Netns {
                name: format!("{id}-c"),
            },
            server: Netns {
                name: format!("{id}-s"),
            },
            client_v4: Ipv4Addr::new(10, a, b, 1),
            client_v4_alt: Ipv4Addr::new(10, a, b, 3),
            server_v4: Ipv4Addr::new(10, a, b, 2),
            client_v6: v6(1),
            server_v6: v6(2),
            aqd,
            bpffs: dir.join("bpffs"),
            dir,
            id,
            dir_created: false,
            mounted: false,
            namespaces: Vec::new(),
            daemon: None,
            daemons_started: 0,
        };
        lab.build(queues)
            .with_context(|| format!("building lab {}", lab.id))?;
        Ok(lab)
    }

    fn build(&mut self, queues: u16) -> anyhow::Result<()> {
        fs::create_dir(&self.dir).with_context(|| format!("creating {}", self.dir.display()))?;
        self.dir_created = true;
        // Everything aqd writes outside bpffs stays in the lab too (never /run/aqd or /var/log/aqd).
        let config = format!(
            "# aqd end-to-end lab {}: built-in defaults, files inside the lab\n[daemon]\nsocket = {:?}\naudit_log = {:?}\n",
            self.id,
            self.socket(),
            self.audit_log()
        );
        fs::write(self.config(), config).with_context(|| format!("writing {}", self.config().display()))?;
        detector_user::loader::mount_bpffs(&self.bpffs)
            .with_context(|| format!("mounting bpffs at {}", self.bpffs.display()))?;
        self.mounted = true;

        for ns in [self.client.clone(), self.server.clone()] {
            ip(&["netns", "add", ns.name()])?;
            self.namespaces.push(ns);
        }
        let (c, s) = (&self.client, &self.server);
        // Created inside the namespaces: the names never exist in (or collide in) the caller's namespace.
        let q = if queues > 1 {
            format!(" numtxqueues {queues} numrxqueues {queues}")
        } else {
            String::new()
        };
        ip_in(
            c,
            &format!(
                "link add {CLIENT_IF} address {CLIENT_MAC}{q} type veth peer name {SERVER_IF} address {SERVER_MAC}{q} \
                 netns {}",
                s.name
            ),
        )?;
        ip_in(c, &format!("addr add {}/24 dev {CLIENT_IF}", self.client_v4))?;
        ip_in(c, &format!("addr add {}/24 dev {CLIENT_IF}", self.client_v4_alt))?;
        ip_in(s, &format!("addr add {}/24 dev {SERVER_IF}", self.server_v4))?;
        ip_in(
            c,
            &format!("addr add {}/64 dev {CLIENT_IF} nodad", self.client_v6),
        )?;
        ip_in(
            s,
            &format!("addr add {}/64 dev {SERVER_IF} nodad", self.server_v6),
        )?;
        // Static neighbours: no ARP/ND, so a blocked address cannot also break neighbour resolution.
        let neigh = |ns: &Netns, addr: IpAddr, dev: &str, mac: &str| {
            ip_in(
                ns,
                &format!("neigh replace {addr} lladdr {mac} dev {dev} nud permanent"),
            )
        };
        neigh(c, self.server_v4.into(), CLIENT_IF, SERVER_MAC)?;
        neigh(c, self.server_v6.into(), CLIENT_IF, SERVER_MAC)?;
        for addr in [
            self.client_v4.into(),
            self.client_v4_alt.into(),
            self.client_v6.into(),
        ] {
            neigh(s, addr, SERVER_IF, CLIENT_MAC)?;
        }
        // Real checksums on the wire, as from a NIC: with TX checksum offload a veth hands over packets whose
        // TCP checksum is only the pseudo-header's, and aqd's kernel verifies checksums.
        for (ns, dev) in [(c, CLIENT_IF), (s, SERVER_IF)] {
            ip(&["netns", "exec", ns.name(), "ethtool", "-K", dev, "tx", "off"])?;
        }
        for (ns, dev) in [(c, CLIENT_IF), (s, SERVER_IF)] {
            ip_in(ns, "link set lo up")?;
            ip_in(ns, &format!("link set {dev} up"))?;
        }
        Ok(())
    }

    /// `<lab>-c` / `<lab>-s` share this id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The `--pin-root` every aqd command of this lab uses (on the lab's private bpffs).
    pub fn pin_root(&self) -> PathBuf {
        self.bpffs.join("aqd")
    }

    /// The versioned directory under [`Self::pin_root`] holding the pinned maps.
    pub fn pin_dir(&self) -> PathBuf {
        detector_user::paths::versioned_pin_dir(&self.pin_root())
    }

    pub fn client_addr(&self, family: Family) -> IpAddr {
        match family {
            Family::V4 => self.client_v4.into(),
            Family::V6 => self.client_v6.into(),
        }
    }

    pub fn server_addr(&self, family: Family) -> IpAddr {
        match family {
            Family::V4 => self.server_v4.into(),
            Family::V6 => self.server_v6.into(),
        }
    }

    /// The server's service socket address for traffic from `from` (same family).
    pub fn service(&self, from: IpAddr) -> SocketAddr {
        let family = if from.is_ipv4() { Family::V4 } else { Family::V6 };
        SocketAddr::new(self.server_addr(family), SERVICE_PORT)
    }

    // ---- the aqd CLI ----

    /// The lab's aqd config file: defaults, with the control socket and audit log inside the lab.
    pub fn config(&self) -> PathBuf {
        self.dir.join("aqd.toml")
    }

    /// The daemon's control socket (set in [`Self::config`]).
    pub fn socket(&self) -> PathBuf {
        self.dir.join("aqd.sock")
    }

    /// The durable state directory (state store and single-instance lock; `AQD_STATE_DIR` of every command).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// The audit log (JSON lines) the daemon and the CLI append decision changes to (set in [`Self::config`]).
    pub fn audit_log(&self) -> PathBuf {
        self.dir.join("audit.jsonl")
    }

    /// `aqd --pin-root <lab> …`, inside the server namespace or in the caller's, with the lab's config file (so
    /// neither a system-wide config, socket or audit log nor another instance's is ever used).
    pub fn aqd_command(&self, in_server: bool) -> Command {
        let mut cmd = if in_server {
            self.server.command(&self.aqd)
        } else {
            Command::new(&self.aqd)
        };
        for var in ["AQD_PIN_ROOT", "AQD_LOG"] {
            cmd.env_remove(var);
        }
        // The socket is also given as an override (`--socket`'s variable): with `--pin-root` and no `--socket`,
        // aqd derives a socket under /run/aqd from the pin root instead of using the config's.
        cmd.env("AQD_CONFIG", self.config())
            .env("AQD_SOCKET", self.socket())
            .env("AQD_STATE_DIR", self.state_dir())
            .arg("--pin-root")
            .arg(self.pin_root());
        cmd
    }

    /// Runs `aqd <args>` (see [`Self::aqd_command`]) inside the server namespace, where the attachment is visible.
    pub fn aqd(&self, args: &[&str]) -> anyhow::Result<CmdOutput> {
        let mut cmd = self.aqd_command(true);
        cmd.args(args);
        run_bounded(cmd, COMMAND_TIMEOUT)
    }

    /// Runs `aqd <args>` in the test's own namespace: the pinned maps (and the control socket) are reachable from
    /// here too; the server's interfaces are not.
    pub fn aqd_outside(&self, args: &[&str]) -> anyhow::Result<CmdOutput> {
        let mut cmd = self.aqd_command(false);
        cmd.args(args);
        run_bounded(cmd, COMMAND_TIMEOUT)
    }

    /// `aqd status --json` in the server namespace.
    pub fn status(&self) -> anyhow::Result<AqdStatus> {
        AqdStatus::parse(&self.aqd(&["status", "--json"])?.ok()?)
    }

    /// The decisions of `aqd list --json`.
    pub fn decisions(&self) -> anyhow::Result<Vec<DecisionInfo>> {
        let out = self.aqd(&["list", "--json"])?.ok()?;
        let view: ListView = out.view()?;
        Ok(view.decisions.iter().map(DecisionInfo::from).collect())
    }

    // ---- the daemon ----

    /// Starts `aqd run` on the server's veth (native mode, [`SERVICE_PORT`] protected) and waits until the program
    /// it loaded is attached. Returns that attachment.
    pub fn start_daemon(&mut self) -> anyhow::Result<Attachment> {
        self.start_daemon_with(&[])
    }

    /// [`Self::start_daemon`] with extra `aqd run` arguments.
    pub fn start_daemon_with(&mut self, extra: &[&str]) -> anyhow::Result<Attachment> {
        self.launch_daemon(true, extra)
    }

    /// Like [`Self::start_daemon_with`], but without `--protected-ports`: the config's `protection.ports` (and
    /// what a reload changes there) apply, as in production.
    pub fn start_daemon_from_config(&mut self, extra: &[&str]) -> anyhow::Result<Attachment> {
        self.launch_daemon(false, extra)
    }

    fn launch_daemon(&mut self, protect_service_port: bool, extra: &[&str]) -> anyhow::Result<Attachment> {
        ensure!(
            self.daemon.is_none(),
            "lab {}: a daemon is already running",
            self.id
        );
        // A new daemon always loads a new program: wait for an id other than the one attached now (a restart).
        let previous = self
            .status()
            .ok()
            .and_then(|s| s.attachments().first().map(|a| a.program_id));
        self.daemons_started += 1;
        let log = self.dir.join(format!("daemon-{}.log", self.daemons_started));
        let log_file = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        // The log is `daemon-<n>.log` in the lab's directory: see `daemon_log`.
        let mut cmd = self.aqd_command(true);
        cmd.args(["run", "-i", SERVER_IF, "--xdp-mode", "native"]);
        if protect_service_port {
            cmd.args(["--protected-ports", &SERVICE_PORT.to_string()]);
        }
        cmd.args(["--stats-interval", "1"])
            .args(extra)
            .env("AQD_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec. The death signal survives
        // the exec of `ip` and of aqd (neither is setuid): if the test process dies without running `Drop` (a
        // SIGKILL, an abort), its daemon dies too instead of running on orphaned. Note that the signal fires when
        // the *thread* that started the daemon exits: keep a lab on the thread that made it (tests do).
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().context("spawning aqd run")?;
        self.daemon = Some(Daemon { child });

        let deadline = Instant::now() + ATTACH_TIMEOUT;
        loop {
            let daemon = self.daemon.as_mut().expect("just started");
            if let Some(status) = daemon.child.try_wait()? {
                self.daemon = None;
                bail!(
                    "aqd run exited with {status} before attaching:\n{}",
                    self.daemon_log(self.daemons_started)
                );
            }
            if let Ok(status) = self.status() {
                let attached = status.attachments();
                if let Some(a) = attached.first()
                    && Some(a.program_id) != previous
                {
                    return Ok(a.clone());
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "aqd run did not attach within {ATTACH_TIMEOUT:?}:\n{}",
                    self.daemon_log(self.daemons_started)
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The pid of the running daemon, if any.
    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(|d| d.child.id())
    }

    /// Stops the daemon with SIGTERM; SIGKILL (and an error) if it has not exited within a few seconds.
    pub fn stop_daemon(&mut self) -> anyhow::Result<ExitStatus> {
        let mut daemon = self.daemon.take().context("no daemon is running")?;
        signal(&daemon.child, libc::SIGTERM)?;
        match wait_timeout(&mut daemon.child, STOP_TIMEOUT)? {
            Some(status) => Ok(status),
            None => {
                let _ = daemon.child.kill();
                let _ = daemon.child.wait();
                bail!("aqd run ignored SIGTERM for {STOP_TIMEOUT:?}; killed it")
            }
        }
    }

    /// All `n` datagrams of a UDP probe from `from` arrive.
    pub fn assert_udp_passes(&self, from: IpAddr, n: usize) -> anyhow::Result<()> {
        let got = self.udp_probe(from, n)?;
        ensure!(
            got == n,
            "expected all {n} datagrams from {from} to arrive, {got} did"
        );
        Ok(())
    }

    /// None of `n` datagrams of a UDP probe from `from` arrive.
    pub fn assert_udp_dropped(&self, from: IpAddr, n: usize) -> anyhow::Result<()> {
        let got = self.udp_probe(from, n)?;
        ensure!(
            got == 0,
            "expected the datagrams from {from} to be dropped, {got} of {n} arrived"
        );
        Ok(())
    }

    /// SIGKILLs the daemon in the middle of a UDP stream from two client sources, `blocked` (which must already
    /// be blocked) and `allowed`, and checks both guarantees of a crash: nothing from `blocked` gets through,
    /// and `allowed` loses nothing, also after the kill. Returns the datagrams sent from each source.
    pub fn assert_enforcement_survives_sigkill(
        &mut self,
        blocked: IpAddr,
        allowed: IpAddr,
    ) -> anyhow::Result<Vec<usize>> {
        let to = self.service(blocked);
        let sink = UdpSink::bind(&self.server, to)?;
        let stream_for = Duration::from_millis(1500);
        let stream = udp_stream(
            &self.client,
            vec![blocked, allowed],
            to,
            Duration::from_millis(2),
            stream_for,
        );
        let arrivals = sink.collect_until(Instant::now() + stream_for + Duration::from_millis(300));
        std::thread::sleep(Duration::from_millis(500));
        let killed_at = Instant::now();
        let status = self.kill_daemon()?;
        ensure!(
            std::os::unix::process::ExitStatusExt::signal(&status) == Some(libc::SIGKILL),
            "the daemon was not SIGKILLed: {status}"
        );
        let sent = stream.join()?;
        let arrivals = arrivals
            .join()
            .map_err(|_| anyhow!("receiver thread panicked"))??;
        let from = |a: IpAddr| arrivals.iter().filter(|x| x.from.ip() == a).count();
        ensure!(from(blocked) == 0, "blocked source got through (sent {sent:?})");
        ensure!(
            from(allowed) == sent[1],
            "allowed traffic was lost around the SIGKILL ({} of {})",
            from(allowed),
            sent[1]
        );
        let after_kill = arrivals
            .iter()
            .filter(|x| x.from.ip() == allowed && x.at > killed_at)
            .count();
        ensure!(
            after_kill >= 100,
            "only {after_kill} allowed datagrams arrived after the SIGKILL"
        );
        Ok(sent)
    }

    /// Kills the daemon with SIGKILL (no chance to clean up) and reaps it.
    pub fn kill_daemon(&mut self) -> anyhow::Result<ExitStatus> {
        let mut daemon = self.daemon.take().context("no daemon is running")?;
        signal(&daemon.child, libc::SIGKILL)?;
        Ok(daemon.child.wait()?)
    }

    /// The log of the `n`th daemon this lab started (1-based), or a note that there is none.
    pub fn daemon_log(&self, n: u32) -> String {
        let path = self.dir.join(format!("daemon-{n}.log"));
        fs::read_to_string(&path).unwrap_or_else(|e| format!("(no log at {}: {e})", path.display()))
    }

    /// Sends `sig` to the running daemon (e.g. SIGHUP to make it reload its config).
    pub fn signal_daemon(&self, sig: libc::c_int) -> anyhow::Result<()> {
        let daemon = self.daemon.as_ref().context("no daemon is running")?;
        signal(&daemon.child, sig)?;
        Ok(())
    }

    /// How the daemon this lab started exited, if it did; `None` while it runs. The daemon stays the lab's
    /// (stop it, kill it or let `Drop` do it).
    pub fn daemon_exit_status(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        let daemon = self.daemon.as_mut().context("no daemon was started")?;
        Ok(daemon.child.try_wait()?)
    }

    /// The `n`th daemon's log, once it contains `needle` (polled until `timeout`); an error with the log if not.
    pub fn wait_for_daemon_log(&self, n: u32, needle: &str, timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.daemon_log(n);
            if log.contains(needle) {
                return Ok(log);
            }
            if Instant::now() >= deadline {
                bail!("daemon {n} did not log {needle:?} within {timeout:?}:\n{log}");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// How many daemons this lab has started (the `n` of the latest [`Self::daemon_log`]).
    pub fn daemons_started(&self) -> u32 {
        self.daemons_started
    }

    // ---- lab files ----

    /// A path inside the lab's private directory (removed with the lab): for list files, configs, imports.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The text of the lab's default config with `daemon_extra` added to its `[daemon]` table and `rest` (more
    /// tables) after it. The control socket and audit log stay inside the lab.
    pub fn config_text(&self, daemon_extra: &str, rest: &str) -> String {
        format!(
            "# aqd end-to-end lab {}\n[daemon]\nsocket = {:?}\naudit_log = {:?}\n{daemon_extra}\n{rest}\n",
            self.id,
            self.socket(),
            self.audit_log()
        )
    }

    /// Replaces the lab's config file ([`Self::config`]) with [`Self::config_text`].
    pub fn write_config(&self, daemon_extra: &str, rest: &str) -> anyhow::Result<()> {
        let path = self.config();
        fs::write(&path, self.config_text(daemon_extra, rest))
            .with_context(|| format!("writing {}", path.display()))
    }

    /// [`Self::aqd`] with its own time limit (bulk commands).
    pub fn aqd_timeout(&self, args: &[&str], timeout: Duration) -> anyhow::Result<CmdOutput> {
        let mut cmd = self.aqd_command(true);
        cmd.args(args);
        run_bounded(cmd, timeout)
    }

    // ---- traffic ----

    /// Sends `n` UDP datagrams from the client address `from` to the server's service port (same family) and
    /// returns how many arrived. Waits until all arrived, or nothing arrived for a moment.
    pub fn udp_probe(&self, from: IpAddr, n: usize) -> anyhow::Result<usize> {
        let to = self.service(from);
        let sink = UdpSink::bind(&self.server, to)?;
        let sent = send_udp(&self.client, from, to, n)?;
        ensure!(sent == n, "sent {sent} of {n} datagrams from {from}");
        let arrived = sink.collect(n, Duration::from_millis(400), Duration::from_secs(3))?;
        Ok(arrived.len())
    }

    /// [`Self::udp_probe`] to another server port (e.g. one aqd does not protect).
    pub fn udp_probe_port(&self, from: IpAddr, port: u16, n: usize) -> anyhow::Result<usize> {
        let to = SocketAddr::new(self.service(from).ip(), port);
        let sink = UdpSink::bind(&self.server, to)?;
        // Everything is sent before anything is read: room for the whole burst.
        sink.set_receive_buffer((n * 4096).max(1 << 20))?;
        let sent = send_udp(&self.client, from, to, n)?;
        ensure!(sent == n, "sent {sent} of {n} datagrams from {from}");
        let arrived = sink.collect(n, Duration::from_millis(400), Duration::from_secs(3))?;
        Ok(arrived.len())
    }

    /// Tries `n` TCP connections from the client (primary address of `family`) to the server's service port,
    /// each with `timeout`.
    pub fn tcp_probe(&self, family: Family, n: usize, timeout: Duration) -> anyhow::Result<TcpReport> {
        let to = SocketAddr::new(self.server_addr(family), SERVICE_PORT);
        let sink = TcpSink::bind(&self.server, to)?;
        let mut report = tcp_connect(&self.client, to, n, timeout)?;
        report.accepted = sink.accept(report.connected, Duration::from_secs(1))?;
        Ok(report)
    }

    // ---- teardown ----

    fn teardown(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(mut daemon) = self.daemon.take() {
            let _ = signal(&daemon.child, libc::SIGTERM);
            if !matches!(
                wait_timeout(&mut daemon.child, Duration::from_secs(2)),
                Ok(Some(_))
            ) {
                let _ = daemon.child.kill();
                if let Err(e) = daemon.child.wait() {
                    problems.push(format!(
                        "aqd run (pid {}) could not be reaped: {e}",
                        daemon.child.id()
                    ));
                }
            }
        }
        for ns in std::mem::take(&mut self.namespaces) {
            if let Err(e) = ip(&["netns", "del", ns.name()]) {
                problems.push(format!("deleting netns {}: {e:#}", ns.name()));
            }
            if ns.path().exists() {
                problems.push(format!("netns {} still exists after deletion", ns.name()));
            }
        }
        if self.mounted {
            if let Err(e) = unmount(&self.bpffs) {
                problems.push(format!("unmounting {}: {e}", self.bpffs.display()));
            }
            self.mounted = false;
            if is_mount_point(&self.bpffs) {
                problems.push(format!("{} is still mounted", self.bpffs.display()));
            }
        }
        if self.dir_created {
            if let Err(e) = fs::remove_dir_all(&self.dir) {
                problems.push(format!("removing {}: {e}", self.dir.display()));
            }
            self.dir_created = false;
            if self.dir.exists() {
                problems.push(format!("{} still exists", self.dir.display()));
            }
        }
        problems
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // The test harness shows this only for failing tests (or with --nocapture).
        for n in 1..=self.daemons_started {
            eprintln!("--- lab {}: daemon {n} log\n{}", self.id, self.daemon_log(n));
        }
        let problems = self.teardown();
        if problems.is_empty() {
            return;
        }
        let message = format!(
            "lab {} was not torn down cleanly:\n  {}",
            self.id,
            problems.join("\n  ")
        );
        if thread::panicking() {
            eprintln!("{message}");
        } else {
            panic!("{message}");
        }
    }
}

fn signal(child: &Child, sig: libc::c_int) -> io::Result<()> {
    let pid = libc::pid_t::try_from(child.id()).map_err(io::Error::other)?;
    // SAFETY: `pid` is our own child, not yet reaped (the Child has not been waited for successfully).
    if unsafe { libc::kill(pid, sig) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn unmount(path: &Path) -> io::Result<()> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    // SAFETY: a NUL-terminated path.
    if unsafe { libc::umount2(c_path.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether `path` is a mount point in this mount namespace.
fn is_mount_point(path: &Path) -> bool {
    let target = path.to_string_lossy();
    fs::read_to_string("/proc/self/mountinfo")
        .map(|info| info.lines().any(|l| l.split(' ').nth(4) == Some(target.as_ref())))
        .unwrap_or(false)
}

/// Removes what labs of test processes that no longer exist left behind (a test binary killed mid-run cannot run
/// `Drop`). Only touches `aqdt-<pid>-…` names whose pid is dead. Runs once per process.
fn reap_stale_labs() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let dead = |name: &str| -> bool {
            let Some(pid) = name
                .strip_prefix(PREFIX)
                .and_then(|r| r.strip_prefix('-'))
                .and_then(|r| r.split('-').next())
                .and_then(|p| p.parse::<libc::pid_t>().ok())
            else {
                return false;
            };
            // SAFETY: signal 0 only checks that the process exists.
            pid != std::process::id() as libc::pid_t
                && unsafe { libc::kill(pid, 0) } != 0
                && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
        };
        let names = |dir: &Path| -> Vec<String> {
            fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| dead(n))
                .collect()
        };
        for name in names(Path::new(NETNS_DIR)) {
            eprintln!("removing stale test netns {name}");
            let _ = ip(&["netns", "del", &name]);
        }
        for name in names(&std::env::temp_dir()) {
            let dir = std::env::temp_dir().join(name);
            let bpffs = dir.join("bpffs");
            if is_mount_point(&bpffs) {
                let _ = unmount(&bpffs);
            }
            eprintln!("removing stale test dir {}", dir.display());
            let _ = fs::remove_dir_all(&dir);
        }
    });
}

// ---------------------------------------------------------------------------------------------------------------
// aqd's JSON output
// ---------------------------------------------------------------------------------------------------------------

/// `aqd status --json`: the typed view, and the JSON as printed (for messages and the few fields a test reads
/// that the view does not name).
#[derive(Clone, Debug)]
pub struct AqdStatus {
    pub view: StatusView,
    pub json: Value,
}

/// One entry of `attachments` in `aqd status --json`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    pub iface: String,
    pub mode: String,
    pub program_id: u32,
}

impl AqdStatus {
    fn parse(out: &CmdOutput) -> anyhow::Result<Self> {
        Ok(Self {
            view: out.view()?,
            json: out.json()?,
        })
    }

    pub fn attachments(&self) -> Vec<Attachment> {
        self.view
            .attachments
            .iter()
            .map(|a| Attachment {
                iface: a.iface.clone(),
                mode: a.mode.to_string(),
                program_id: a.program_id,
            })
            .collect()
    }

    fn kernel(&self) -> &KernelStatus {
        self.view
            .kernel
            .as_ref()
            .unwrap_or_else(|| panic!("no kernel counters (nothing pinned?) in {}", self.json))
    }

    /// A per-reason packet counter (`pass_default`, `drop_block_exact`, …). Panics on an unknown name.
    pub fn reason(&self, name: &str) -> u64 {
        *self
            .kernel()
            .reasons
            .get(name)
            .unwrap_or_else(|| panic!("no reason counter {name} in {}", self.json))
    }

    /// Whether the answer came from a running daemon (`daemon.running`).
    pub fn daemon_running(&self) -> Option<bool> {
        Some(self.view.daemon.running)
    }

    pub fn packets(&self) -> u64 {
        self.kernel().packets
    }

    pub fn dropped(&self) -> u64 {
        self.kernel().dropped
    }
}

/// One decision of `aqd list --json`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecisionInfo {
    pub net: String,
    pub action: String,
    pub origin: String,
    pub hits: u64,
    /// None = permanent.
    pub remaining_secs: Option<u64>,
}

impl From<&DecisionRow> for DecisionInfo {
    fn from(d: &DecisionRow) -> Self {
        let name = |n: Option<&'static str>| n.unwrap_or("unknown").to_string();
        Self {
            net: d.net.to_string(),
            action: name(d.action.map(|a| a.name())),
            origin: name(d.origin.map(|o| o.name())),
            hits: d.hits,
            remaining_secs: d.remaining_secs,
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Traffic
// ---------------------------------------------------------------------------------------------------------------

/// One received datagram.
#[derive(Clone, Copy, Debug)]
pub struct Arrival {
    pub from: SocketAddr,
    pub at: Instant,
}

/// A UDP socket bound in a namespace that counts what arrives.
#[derive(Debug)]
pub struct UdpSink {
    socket: UdpSocket,
}

impl UdpSink {
    pub fn bind(ns: &Netns, addr: SocketAddr) -> io::Result<Self> {
        let socket = ns.run(move || UdpSocket::bind(addr))?;
        Ok(Self { socket })
    }

    /// Sets the socket's receive buffer to `bytes` (SO_RCVBUFFORCE: root, beyond `rmem_max`), so a burst sent
    /// before anything is read is not dropped by the receiver.
    pub fn set_receive_buffer(&self, bytes: usize) -> io::Result<()> {
        let size = libc::c_int::try_from(bytes).map_err(io::Error::other)?;
        // SAFETY: a valid socket fd and a c_int option value of the size given.
        let rc = unsafe {
            libc::setsockopt(
                self.socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Receives until `expect` datagrams arrived, nothing arrived for `quiet`, or `max` passed.
    pub fn collect(&self, expect: usize, quiet: Duration, max: Duration) -> io::Result<Vec<Arrival>> {
        let start = Instant::now();
        let mut last = start;
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        while got.len() < expect {
            let now = Instant::now();
            let (Some(left), Some(idle_left)) = (max.checked_sub(now - start), quiet.checked_sub(now - last))
            else {
                break;
            };
            self.socket
                .set_read_timeout(Some(left.min(idle_left).max(Duration::from_millis(1))))?;
            match self.socket.recv_from(&mut buf) {
                Ok((_, from)) => {
                    last = Instant::now();
                    got.push(Arrival { from, at: last });
                }
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(got)
    }

    /// Receives everything that arrives until `deadline`, on a background thread.
    pub fn collect_until(self, deadline: Instant) -> JoinHandle<io::Result<Vec<Arrival>>> {
        thread::spawn(move || {
            let mut got = Vec::new();
            let mut buf = [0u8; 2048];
            while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                self.socket
                    .set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
                match self.socket.recv_from(&mut buf) {
                    Ok((_, from)) => got.push(Arrival {
                        from,
                        at: Instant::now(),
                    }),
                    Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(got)
        })
    }
}

/// Sends `n` datagrams (a sequence number each) from `from` to `to` inside `ns`; returns how many were sent.
pub fn send_udp(ns: &Netns, from: IpAddr, to: SocketAddr, n: usize) -> io::Result<usize> {
    ns.run(move || {
        let socket = UdpSocket::bind(SocketAddr::new(from, 0))?;
        for seq in 0..n {
            socket.send_to(&(seq as u32).to_be_bytes(), to)?;
        }
        Ok(n)
    })
}

/// Sends one datagram from each of `sources` to `to` every `interval`, for `duration`, inside `ns`. The task
/// returns how many each source sent.
pub fn udp_stream(
    ns: &Netns,
    sources: Vec<IpAddr>,
    to: SocketAddr,
    interval: Duration,
    duration: Duration,
) -> NsTask<Vec<usize>> {
    ns.spawn(move || {
        let sockets = sources
            .iter()
            .map(|s| UdpSocket::bind(SocketAddr::new(*s, 0)))
            .collect::<io::Result<Vec<_>>>()?;
        let mut sent = vec![0usize; sockets.len()];
        let start = Instant::now();
        let mut tick = 0u32;
        while start.elapsed() < duration {
            for (socket, count) in sockets.iter().zip(&mut sent) {
                socket.send_to(&tick.to_be_bytes(), to)?;
                *count += 1;
            }
            tick += 1;
            // Paced against the start, so slow iterations do not stretch the run.
            if let Some(wait) = (start + interval * tick).checked_duration_since(Instant::now()) {
                thread::sleep(wait);
            }
        }
        Ok(sent)
    })
}

/// A TCP listener bound in a namespace. The kernel completes handshakes into its backlog without `accept`.
#[derive(Debug)]
pub struct TcpSink {
    listener: TcpListener,
}

impl TcpSink {
    pub fn bind(ns: &Netns, addr: SocketAddr) -> io::Result<Self> {
        let listener = ns.run(move || TcpListener::bind(addr))?;
        listener.set_nonblocking(true)?;
        Ok(Self { listener })
    }

    /// Accepts until `expect` connections were accepted or `max` passed; returns how many.
    pub fn accept(&self, expect: usize, max: Duration) -> io::Result<usize> {
        let deadline = Instant::now() + max;
        let mut accepted = 0;
        while accepted < expect && Instant::now() < deadline {
            match self.listener.accept() {
                Ok(_) => accepted += 1,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => thread::sleep(Duration::from_millis(5)),
                Err(e) => return Err(e),
            }
        }
        Ok(accepted)
    }
}

/// What [`tcp_connect`] saw.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TcpReport {
    /// Connects that completed the handshake.
    pub connected: usize,
    /// Connects that got no answer within the timeout.
    pub timed_out: usize,
    /// Any other failure (refused, unreachable, …), as text.
    pub failed: Vec<String>,
    /// Connections the server accepted (filled by [`Lab::tcp_probe`]).
    pub accepted: usize,
}

/// Tries `n` sequential connects to `to` from inside `ns`, each with `timeout`; closes each one that succeeds.
pub fn tcp_connect(ns: &Netns, to: SocketAddr, n: usize, timeout: Duration) -> io::Result<TcpReport> {
    ns.run(move || {
        let mut report = TcpReport::default();
        for _ in 0..n {
            match TcpStream::connect_timeout(&to, timeout) {
                Ok(stream) => {
                    report.connected += 1;
                    drop(stream);
                }
                Err(e) if matches!(e.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock) => {
                    report.timed_out += 1;
                }
                Err(e) => report.failed.push(e.to_string()),
            }
        }
        Ok(report)
    })
}

/// The id of the XDP program `ip` reports on `dev` inside `ns`, if any (the kernel's view, independent of aqd).
pub fn xdp_program_id(ns: &Netns, dev: &str) -> anyhow::Result<Option<u32>> {
    let mut cmd = Command::new("ip");
    cmd.args(["-n", ns.name(), "-j", "link", "show", "dev", dev]);
    let json = run_bounded(cmd, COMMAND_TIMEOUT)?.ok()?.json()?;
    Ok(json[0]["xdp"]["prog"]["id"].as_u64().map(|id| id as u32))
}

/// Whether the kernel still has a BPF program with this id loaded.
pub fn program_loaded(id: u32) -> bool {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .any(|p| p.id() == id)
}

/// `GET <path>` over HTTP/1.1 to `addr` from inside `ns` (connection closed by the server); returns the whole
/// response, head and body. Retries the connect until `timeout` (a listener that is still starting).
pub fn http_get(ns: &Netns, addr: SocketAddr, path: &str, timeout: Duration) -> io::Result<String> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    ns.run(move || {
        let deadline = Instant::now() + timeout;
        let mut stream = loop {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline && e.kind() == io::ErrorKind::ConnectionRefused => {
                    thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(e),
            }
        };
        stream.set_read_timeout(Some(timeout))?;
        io::Write::write_all(&mut stream, request.as_bytes())?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response)
    })
}

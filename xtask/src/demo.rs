//! `cargo xtask demo`: aqd in a two-namespace lab — traffic passes, a block drops it, an unblock lets it through.
//!
//! ```text
//!   netns aqd-demo-cli                      netns aqd-demo-srv
//!   veth-cli 10.201.0.1/24  <── veth ──>  veth-srv 10.201.0.2/24  ← aqd run (native XDP), UDP receiver :9000
//! ```
//! Invariants: all traffic stays between the two namespaces created here and is bounded (a few rounds of
//! `--count` datagrams, each receiver window a few seconds). The bpffs is mounted under the temp directory, not
//! under /sys (`ip netns exec` remounts /sys, so pins there are not visible inside it). Everything the demo
//! creates — daemon, XDP attachment, pins, namespaces, bpffs mount — is removed by [`Lab`]'s `Drop`, also when a
//! step fails or on Ctrl-C; leftovers of a run that was killed outright are removed at the next start.
//!
//! The traffic itself comes from this same binary, re-executed inside the namespaces with the hidden
//! subcommands `demo-send` and `demo-recv` (plain std sockets; no other tools needed).

use std::{
    ffi::CString,
    fs,
    io::{self, BufRead as _, BufReader, Write as _},
    net::{SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use clap::Args;

use crate::{bootstrap, util};

const CLIENT_NS: &str = "aqd-demo-cli";
const SERVER_NS: &str = "aqd-demo-srv";
const CLIENT_IF: &str = "veth-cli";
const SERVER_IF: &str = "veth-srv";
const CLIENT_ADDR: &str = "10.201.0.1";
const SERVER_ADDR: &str = "10.201.0.2";
const PREFIX_LEN: u8 = 24;
const PORT: u16 = 9000;
/// How long a receiver waits for the datagrams of one round.
const RECEIVE_WINDOW: Duration = Duration::from_secs(3);
/// How long `aqd run` may take to load and attach.
const DAEMON_START_TIMEOUT: Duration = Duration::from_secs(60);
/// Payload prefix; the receiver counts only datagrams that carry it.
const PAYLOAD_TAG: &[u8] = b"aqd-demo ";
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// `println!` that ignores a closed stdout: teardown must finish even when nobody reads its report.
macro_rules! say {
    ($($arg:tt)*) => {{
        let _ = writeln!(io::stdout(), $($arg)*);
    }};
}

/// `eprintln!` that ignores a closed stderr.
macro_rules! esay {
    ($($arg:tt)*) => {{
        let _ = writeln!(io::stderr(), $($arg)*);
    }};
}

#[derive(Args)]
pub struct DemoArgs {
    /// UDP datagrams the client sends in each round.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=1000))]
    count: u32,
}

#[derive(Args)]
pub struct SendArgs {
    /// Destination address and port.
    #[arg(long)]
    to: SocketAddr,
    /// Number of datagrams.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    count: u32,
    /// Pause between datagrams, in milliseconds.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(0..=1000))]
    interval_ms: u64,
}

#[derive(Args)]
pub struct RecvArgs {
    /// Address and port to listen on.
    #[arg(long)]
    bind: SocketAddr,
    /// Stop early once this many datagrams have arrived.
    #[arg(long)]
    expect: u32,
    /// Stop after this many milliseconds at most.
    #[arg(long, default_value_t = 3000, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    timeout_ms: u64,
}

/// `demo-send`: sends `count` tagged datagrams, prints how many were sent.
pub fn send(args: &SendArgs) -> anyhow::Result<()> {
    let local: SocketAddr = if args.to.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let socket = UdpSocket::bind(local).context("binding the sender socket")?;
    let mut sent = 0u32;
    let mut errors = 0u32;
    for seq in 0..args.count {
        let payload = [PAYLOAD_TAG, seq.to_string().as_bytes()].concat();
        match socket.send_to(&payload, args.to) {
            Ok(_) => sent += 1,
            Err(_) => errors += 1,
        }
        thread::sleep(Duration::from_millis(args.interval_ms));
    }
    println!("sent {sent} datagrams to {} ({errors} send errors)", args.to);
    Ok(())
}

/// `demo-recv`: binds, prints `ready`, counts tagged datagrams until `expect` arrived or the timeout, prints
/// `received N`.
pub fn receive(args: &RecvArgs) -> anyhow::Result<()> {
    let socket = UdpSocket::bind(args.bind).with_context(|| format!("binding {}", args.bind))?;
    println!("ready");
    io::stdout().flush()?;
    let deadline = Instant::now() + Duration::from_millis(args.timeout_ms);
    let mut received = 0u32;
    let mut buf = [0u8; 2048];
    while received < args.expect {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        socket.set_read_timeout(Some(left))?;
        match socket.recv_from(&mut buf) {
            Ok((n, _)) if buf[..n].starts_with(PAYLOAD_TAG) => received += 1,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("receiving"),
        }
    }
    println!("received {received}");
    Ok(())
}

/// `cargo xtask demo`.
pub fn run(args: &DemoArgs) -> anyhow::Result<()> {
    util::require_root("`cargo xtask demo`")?;
    bootstrap::ensure()?;
    let built = util::cargo_build(&["--package", "detector-user", "--bin", "aqd"])?;
    let aqd = util::find_binary(&built, "aqd")?;
    let this = std::env::current_exe().context("locating the xtask binary")?;
    catch_ctrl_c();

    let _lock = exclusive_lock()?;
    let mut lab = Lab::new(aqd, this);
    lab.set_up()?;
    lab.demonstrate(args.count)?;
    lab.teardown();
    println!(
        "\ndemo finished: traffic passed, was dropped in XDP while blocked, and passed again after unblock."
    );
    Ok(())
}

/// One demo at a time: the lab's names are fixed, and leftover removal assumes no other demo is running. The
/// lock dies with the process, so a killed demo never blocks the next one.
fn exclusive_lock() -> anyhow::Result<fs::File> {
    use std::os::fd::AsRawFd as _;
    let path = std::env::temp_dir().join("aqd-demo.lock");
    let file = fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    // SAFETY: flock on a file descriptor we own; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!(
            "another `cargo xtask demo` is running (it holds {}); wait for it to finish",
            path.display()
        );
    }
    Ok(file)
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Ctrl-C ends the demo at the next step and still tears the lab down.
fn catch_ctrl_c() {
    let handler: extern "C" fn(libc::c_int) = on_sigint;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, handler as libc::sighandler_t);
    }
}

fn check_interrupted() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// The lab: what has been created so far, so that [`Lab::teardown`] (also run on drop) removes exactly that.
struct Lab {
    aqd: PathBuf,
    xtask: PathBuf,
    tmp: PathBuf,
    bpffs: PathBuf,
    pin_root: PathBuf,
    config: PathBuf,
    audit_log: PathBuf,
    daemon_log: PathBuf,
    namespaces: Vec<&'static str>,
    mounted: bool,
    daemon: Option<Child>,
    /// `aqd run` was started, so there may be an attachment and pins to remove.
    daemon_started: bool,
    torn_down: bool,
}

impl Lab {
    fn new(aqd: PathBuf, xtask: PathBuf) -> Self {
        let tmp = std::env::temp_dir().join("aqd-demo");
        let bpffs = tmp.join("bpffs");
        Lab {
            aqd,
            xtask,
            pin_root: bpffs.join("aqd"),
            config: tmp.join("aqd.toml"),
            audit_log: tmp.join("audit.jsonl"),
            daemon_log: tmp.join("aqd-run.log"),
            bpffs,
            tmp,
            namespaces: Vec::new(),
            mounted: false,
            daemon: None,
            daemon_started: false,
            torn_down: false,
        }
    }

    fn set_up(&mut self) -> anyhow::Result<()> {
        self.remove_leftovers()?;

        util::heading(&format!(
            "Creating namespaces {CLIENT_NS} and {SERVER_NS}, joined by a veth ({CLIENT_IF} {CLIENT_ADDR} <-> \
             {SERVER_IF} {SERVER_ADDR})"
        ));
        for ns in [CLIENT_NS, SERVER_NS] {
            quiet(Command::new("ip").args(["netns", "add", ns]))?;
            self.namespaces.push(ns);
        }
        quiet(Command::new("ip").args([
            "link", "add", CLIENT_IF, "netns", CLIENT_NS, "type", "veth", "peer", "name", SERVER_IF, "netns",
            SERVER_NS,
        ]))?;
        for (ns, dev, addr) in [
            (CLIENT_NS, CLIENT_IF, CLIENT_ADDR),
            (SERVER_NS, SERVER_IF, SERVER_ADDR),
        ] {
            let cidr = format!("{addr}/{PREFIX_LEN}");
            quiet(Command::new("ip").args(["-n", ns, "addr", "add", &cidr, "dev", dev]))?;
            quiet(Command::new("ip").args(["-n", ns, "link", "set", dev, "up"]))?;
            quiet(Command::new("ip").args(["-n", ns, "link", "set", "lo", "up"]))?;
        }

        util::heading(&format!(
            "Mounting a bpffs at {} (outside /sys, so pins are visible inside `ip netns exec`)",
            self.bpffs.display()
        ));
        fs::create_dir_all(&self.bpffs).with_context(|| format!("creating {}", self.bpffs.display()))?;
        mount_bpffs(&self.bpffs).with_context(|| format!("mounting bpffs at {}", self.bpffs.display()))?;
        self.mounted = true;

        // The lab's own config: the host's /etc/aqd/aqd.toml (interfaces, lists, audit log) stays out of it.
        fs::write(
            &self.config,
            format!(
                "# cargo xtask demo\n[daemon]\npin_root = {:?}\naudit_log = {:?}\nmetrics_address = \"\"\n",
                self.pin_root, self.audit_log
            ),
        )
        .with_context(|| format!("writing {}", self.config.display()))?;

        check_interrupted()?;
        self.start_daemon()
    }

    fn start_daemon(&mut self) -> anyhow::Result<()> {
        let mut cmd = self.aqd_cmd(&[
            "run",
            "-i",
            SERVER_IF,
            "--xdp-mode",
            "native",
            "--protected-ports",
            &PORT.to_string(),
            "--stats-interval",
            "5",
        ]);
        util::heading(&format!(
            "Starting the daemon in {SERVER_NS} (log: {})",
            self.daemon_log.display()
        ));
        println!("[{SERVER_NS}]# {}", self.show(&cmd));
        let log = fs::File::create(&self.daemon_log)?;
        // The log is a file: no colour codes in it.
        cmd.env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.daemon = Some(cmd.spawn().context("starting aqd run")?);
        self.daemon_started = true;

        let started = Instant::now();
        loop {
            check_interrupted()?;
            if let Some(status) = self
                .daemon
                .as_mut()
                .and_then(|d| d.try_wait().transpose())
                .transpose()?
            {
                self.daemon = None;
                bail!(
                    "aqd run exited early ({status}); its log:\n{}",
                    fs::read_to_string(&self.daemon_log).unwrap_or_default()
                );
            }
            if let Some(attachment) = self.attachment()? {
                println!(
                    "aqd is attached to {SERVER_IF}: {attachment} (after {:.1} s)",
                    started.elapsed().as_secs_f64()
                );
                return Ok(());
            }
            if started.elapsed() > DAEMON_START_TIMEOUT {
                bail!(
                    "aqd run did not attach within {} s; its log:\n{}",
                    DAEMON_START_TIMEOUT.as_secs(),
                    fs::read_to_string(&self.daemon_log).unwrap_or_default()
                );
            }
            thread::sleep(Duration::from_millis(250));
        }
    }

    /// The attachment on the server's veth per `aqd status --json`, if there is one yet.
    fn attachment(&self) -> anyhow::Result<Option<String>> {
        let Some(status) = self.status_json()? else {
            return Ok(None);
        };
        Ok(status["attachments"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["iface"] == SERVER_IF)
            .map(|a| {
                format!(
                    "{} mode, program id {}",
                    a["mode"].as_str().unwrap_or("?"),
                    a["program_id"]
                )
            }))
    }

    /// `aqd status --json` in the server namespace; `None` while the pins do not exist yet.
    fn status_json(&self) -> anyhow::Result<Option<serde_json::Value>> {
        let out = self.aqd_cmd(&["status", "--json"]).output()?;
        if !out.status.success() {
            return Ok(None);
        }
        Ok(Some(
            serde_json::from_slice(&out.stdout).context("parsing `aqd status --json`")?,
        ))
    }

    fn demonstrate(&mut self, count: u32) -> anyhow::Result<()> {
        util::heading("Round 1: the client sends, nothing is blocked");
        let received = self.round(count)?;
        ensure!(
            received == count,
            "expected all {count} datagrams to arrive, got {received}"
        );

        util::heading(&format!("Blocking the client {CLIENT_ADDR} for 10 minutes"));
        self.aqd_show(&["block", CLIENT_ADDR, "--ttl", "10m"])?;

        util::heading("Round 2: the client sends again while blocked");
        let received = self.round(count)?;
        ensure!(
            received == 0,
            "expected XDP to drop all {count} datagrams, but {received} arrived"
        );

        util::heading("aqd status: the drops are counted under drop_block_exact");
        self.aqd_show(&["status"])?;
        let dropped = self
            .status_json()?
            .and_then(|s| s["reasons"]["drop_block_exact"].as_u64())
            .context("`aqd status --json` has no reasons.drop_block_exact")?;
        ensure!(
            dropped >= u64::from(count),
            "drop_block_exact is {dropped}, expected at least {count}"
        );

        util::heading("aqd list: the decision, its hits and its time left");
        self.aqd_show(&["list"])?;

        util::heading(&format!("Unblocking the client {CLIENT_ADDR}"));
        self.aqd_show(&["unblock", CLIENT_ADDR])?;

        util::heading("Round 3: the client sends again after unblock");
        let received = self.round(count)?;
        ensure!(
            received == count,
            "expected all {count} datagrams to arrive after unblock, got {received}"
        );
        Ok(())
    }

    /// One round: a receiver in the server namespace, `count` datagrams from the client namespace. Returns how
    /// many arrived.
    fn round(&self, count: u32) -> anyhow::Result<u32> {
        check_interrupted()?;
        let server = format!("{SERVER_ADDR}:{PORT}");
        let mut receiver = in_netns(SERVER_NS, &self.xtask)
            .args([
                "demo-recv",
                "--bind",
                &server,
                "--expect",
                &count.to_string(),
                "--timeout-ms",
            ])
            .arg(RECEIVE_WINDOW.as_millis().to_string())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the receiver")?;
        let mut lines = BufReader::new(receiver.stdout.take().expect("stdout is piped")).lines();
        match lines.next() {
            Some(Ok(line)) if line == "ready" => {}
            other => {
                let _ = receiver.wait();
                bail!("the receiver did not start (printed {other:?})");
            }
        }
        let out = in_netns(CLIENT_NS, &self.xtask)
            .args(["demo-send", "--to", &server, "--count", &count.to_string()])
            .output()
            .context("running the sender")?;
        ensure!(
            out.status.success(),
            "the sender failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        println!(
            "client {CLIENT_ADDR}: {}",
            String::from_utf8_lossy(&out.stdout).trim()
        );
        let mut received = None;
        for line in lines {
            if let Some(n) = line?.strip_prefix("received ") {
                received = Some(n.trim().parse::<u32>()?);
            }
        }
        let status = receiver.wait()?;
        let received = received.with_context(|| format!("the receiver reported nothing ({status})"))?;
        println!("server {SERVER_ADDR}:{PORT}: received {received} of {count}");
        Ok(received)
    }

    /// `ip netns exec <server ns> aqd --config <lab config> --pin-root <lab pins> <args>`.
    fn aqd_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = in_netns(SERVER_NS, &self.aqd);
        cmd.arg("--config")
            .arg(&self.config)
            .arg("--pin-root")
            .arg(&self.pin_root)
            // The durable state stays in the lab's directory too (never /var/lib/aqd).
            .arg("--state-dir")
            .arg(self.config.with_file_name("state"))
            .args(args);
        cmd
    }

    /// Runs an aqd command in the server namespace and shows it with its output.
    fn aqd_show(&self, args: &[&str]) -> anyhow::Result<()> {
        let mut cmd = self.aqd_cmd(args);
        println!("[{SERVER_NS}]# {}", self.show(&cmd));
        util::run(&mut cmd)
    }

    /// A command line without the `ip netns exec <ns>` prefix and with `aqd` by name.
    fn show(&self, cmd: &Command) -> String {
        cmd.get_args()
            .skip(3)
            .map(|a| {
                if Path::new(a) == self.aqd {
                    "aqd".into()
                } else {
                    a.to_string_lossy().into_owned()
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Removes what a demo that was killed outright left behind: processes inside the demo namespaces (only
    /// the demo starts any), the namespaces, the bpffs mount.
    fn remove_leftovers(&self) -> anyhow::Result<()> {
        let stale: Vec<&str> = [CLIENT_NS, SERVER_NS]
            .into_iter()
            .filter(|ns| netns_exists(ns))
            .collect();
        if stale.is_empty() && !is_bpffs(&self.bpffs) {
            return Ok(());
        }
        util::heading("Removing leftovers of an earlier demo run");
        for ns in stale {
            let pids = Command::new("ip").args(["netns", "pids", ns]).output()?;
            for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<libc::pid_t>() {
                    println!("killing process {pid} left in namespace {ns}");
                    // SAFETY: kill has no memory-safety preconditions; the pid was read from our namespace.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            quiet(Command::new("ip").args(["netns", "del", ns]))?;
            println!("deleted namespace {ns}");
        }
        if is_bpffs(&self.bpffs) {
            unmount(&self.bpffs)?;
            println!("unmounted {}", self.bpffs.display());
        }
        Ok(())
    }

    /// Removes everything the lab created, in reverse order; best effort, reporting what it could not remove.
    fn teardown(&mut self) {
        if self.torn_down {
            return;
        }
        self.torn_down = true;
        say!("\n==> Teardown");
        if let Some(daemon) = self.daemon.take() {
            stop(daemon);
        }
        if let Ok(log) = fs::read_to_string(&self.daemon_log) {
            say!("aqd run's log:");
            for line in log.lines() {
                say!("    {line}");
            }
        }
        if self.daemon_started && self.mounted {
            let mut detach = self.aqd_cmd(&["detach"]);
            say!("[{SERVER_NS}]# {}", self.show(&detach));
            if let Err(e) = util::run(&mut detach) {
                esay!("warning: {e:#}");
            }
        }
        for ns in self.namespaces.drain(..).rev() {
            match quiet(Command::new("ip").args(["netns", "del", ns])) {
                Ok(()) => say!("deleted namespace {ns} (and its end of the veth)"),
                Err(e) => esay!("warning: deleting namespace {ns}: {e:#}"),
            }
        }
        if self.mounted {
            match unmount(&self.bpffs) {
                Ok(()) => say!("unmounted {}", self.bpffs.display()),
                Err(e) => esay!("warning: {e:#}"),
            }
            self.mounted = false;
        }
        if let Ok(audit) = fs::read_to_string(&self.audit_log) {
            say!("audit log ({}):", self.audit_log.display());
            for line in audit.lines() {
                say!("    {line}");
            }
        }
        for file in [&self.daemon_log, &self.config, &self.audit_log] {
            let _ = fs::remove_file(file);
        }
        if !is_bpffs(&self.bpffs) {
            let _ = fs::remove_dir(&self.bpffs);
            let _ = fs::remove_dir(&self.tmp);
        }

        let left: Vec<String> = [CLIENT_NS, SERVER_NS]
            .into_iter()
            .filter(|ns| netns_exists(ns))
            .map(|ns| format!("namespace {ns}"))
            .chain(is_bpffs(&self.bpffs).then(|| format!("bpffs at {}", self.bpffs.display())))
            .collect();
        if left.is_empty() {
            say!("teardown complete: no namespaces, mounts or daemons left");
        } else {
            esay!("warning: teardown left {}", left.join(", "));
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// `ip netns exec <ns> <program>`.
fn in_netns(ns: &str, program: &Path) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).arg(program);
    cmd
}

/// Runs a setup command, showing its output only when it fails.
fn quiet(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run `{}`", util::display(cmd)))?;
    ensure!(
        out.status.success(),
        "`{}` failed ({}): {}",
        util::display(cmd),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// SIGTERM, then SIGKILL after 5 s; always reaps.
fn stop(mut child: Child) {
    let pid = child.id();
    if let Ok(Some(status)) = child.try_wait() {
        say!("aqd run (pid {pid}) had already exited ({status})");
        return;
    }
    // SAFETY: kill has no memory-safety preconditions; `pid` is our own unreaped child, so it was not reused.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            say!("stopped aqd run (pid {pid}, {status}); the XDP program stays attached until `aqd detach`");
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    esay!("warning: aqd run (pid {pid}) ignored SIGTERM and was killed");
}

fn netns_exists(ns: &str) -> bool {
    Path::new("/run/netns").join(ns).exists()
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = c_path(path) else {
        return false;
    };
    // SAFETY: `st` is a plain C struct the call fills; `c` is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type as i64 == BPF_FS_MAGIC
}

fn mount_bpffs(path: &Path) -> io::Result<()> {
    let target = c_path(path)?;
    // SAFETY: all pointers are valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn unmount(path: &Path) -> anyhow::Result<()> {
    let target = c_path(path)?;
    // SAFETY: `target` is NUL-terminated.
    if unsafe { libc::umount2(target.as_ptr(), 0) } != 0 {
        let e = io::Error::last_os_error();
        // Still busy (a process holds it open): detach it lazily so it goes away with the last user.
        // SAFETY: as above.
        if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0 {
            return Err(e).with_context(|| format!("unmounting {}", path.display()));
        }
    }
    Ok(())
}

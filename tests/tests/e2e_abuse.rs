//! End to end: the control plane holds under abuse (issue 10, item 3). A daemon in a two-namespace lab
//! ([`aqd_tests::netns::Lab`]) with the open-files limit a systemd service gets by default (1,024, soft and hard
//! here, so the daemon cannot raise it), then:
//! - 1,000 idle connections to the metrics port from an unprivileged user (a forked process that drops to
//!   `nobody` inside the server namespace),
//! - 300 idle control clients, 20 clients sending oversized requests and one that never reads its (large) reply,
//!
//! and still `aqd status` answers within 2 s, an `aqd block` takes effect (visible in `aqd list`), the daemon's
//! PID never changes, and the client that never reads is dropped at the write deadline. A second test runs the
//! daemon out of descriptors (EMFILE on `accept`) and checks the control server survives it.
//!
//! Bounded: every connection count is fixed, every wait has a deadline, the forked holder exits when its pipe
//! closes (the test ends or dies) and is killed by its guard. Needs root; skipped with a message otherwise.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail, ensure};
use aqd_tests::netns::{self, Lab};
use serde_json::Value;

/// The metrics endpoint inside the server namespace (loopback: every lab has its own).
const METRICS: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9477);
/// `nobody` on Debian.
const NOBODY: u32 = 65534;
/// The soft and hard open-files limit the daemon runs with (systemd's default soft limit for a service).
const NOFILE: u64 = 1024;
/// The daemon's write deadline on the control socket (control.rs `WRITE_TIMEOUT`) and some slack.
const WRITE_DEADLINE_AND_SLACK: Duration = Duration::from_secs(40);

/// Sets the soft and hard `RLIMIT_NOFILE` of a running process (what `prlimit --pid` does).
fn set_nofile(pid: u32, limit: u64) -> anyhow::Result<()> {
    let new = libc::rlimit {
        rlim_cur: limit,
        rlim_max: limit,
    };
    // SAFETY: prlimit reads `new` and writes nothing (null old limit).
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &new,
            std::ptr::null_mut(),
        )
    };
    ensure!(
        rc == 0,
        "prlimit({pid}, NOFILE, {limit}): {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// Descriptors the process holds now.
fn open_fds(pid: u32) -> anyhow::Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// A forked process in the server namespace, running as `nobody`, holding idle TCP connections. Killed on drop;
/// it also exits by itself when the test process goes away (its hold pipe closes).
struct IdleHolder {
    pid: libc::pid_t,
    hold_w: libc::c_int,
}

impl IdleHolder {
    /// Forks (from a thread inside `lab.server`) a process that drops to `nobody` and opens `n` connections to
    /// `to`, and waits until they are all open.
    fn start(lab: &Lab, to: SocketAddrV4, n: usize) -> anyhow::Result<Self> {
        let (pid, ready_r, hold_w) = lab.server.run(move || {
            let mut ready = [0 as libc::c_int; 2];
            let mut hold = [0 as libc::c_int; 2];
            // SAFETY: pipe2 writes two descriptors into each array.
            unsafe {
                if libc::pipe2(ready.as_mut_ptr(), libc::O_CLOEXEC) != 0
                    || libc::pipe2(hold.as_mut_ptr(), libc::O_CLOEXEC) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            let addr = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: to.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*to.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            let limit = libc::rlimit {
                rlim_cur: n as u64 + 64,
                rlim_max: n as u64 + 64,
            };
            // SAFETY: between fork and _exit the child only makes async-signal-safe system calls on data prepared
            // before the fork (no allocation, no locks).
            let pid = unsafe { libc::fork() };
            if pid < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if pid == 0 {
                unsafe {
                    libc::close(ready[0]);
                    libc::close(hold[1]);
                    let fail = |code: u8| -> ! {
                        let b = [code];
                        libc::write(ready[1], b.as_ptr().cast(), 1);
                        libc::_exit(1)
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        fail(b'L');
                    }
                    if libc::setgroups(0, std::ptr::null()) != 0
                        || libc::setgid(NOBODY) != 0
                        || libc::setuid(NOBODY) != 0
                    {
                        fail(b'U');
                    }
                    for _ in 0..n {
                        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
                        if fd < 0 {
                            fail(b'S');
                        }
                        if libc::connect(
                            fd,
                            (&addr as *const libc::sockaddr_in).cast(),
                            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                        ) != 0
                        {
                            fail(b'C');
                        }
                    }
                    let ok = [b'R'];
                    libc::write(ready[1], ok.as_ptr().cast(), 1);
                    let mut b = [0u8; 1];
                    // Returns when the test closes its end (or dies).
                    libc::read(hold[0], b.as_mut_ptr().cast(), 1);
                    libc::_exit(0)
                }
            }
            unsafe {
                libc::close(ready[1]);
                libc::close(hold[0]);
            }
            Ok((pid, ready[0], hold[1]))
        })?;
        let holder = Self { pid, hold_w };
        // Wait (bounded) for the child's verdict.
        let mut pfd = libc::pollfd {
            fd: ready_r,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll and read on our own pipe end.
        let polled = unsafe { libc::poll(&mut pfd, 1, 20_000) };
        let mut b = [0u8; 1];
        let got = if polled == 1 {
            unsafe { libc::read(ready_r, b.as_mut_ptr().cast(), 1) }
        } else {
            0
        };
        unsafe { libc::close(ready_r) };
        match (got, b[0]) {
            (1, b'R') => Ok(holder),
            (1, why) => bail!(
                "the idle-connection holder failed at step {:?} (L: rlimit, U: setuid, S: socket, C: connect)",
                why as char
            ),
            _ => bail!("the idle-connection holder did not open {n} connections within 20 s"),
        }
    }

    /// The real uid of the holder process.
    fn uid(&self) -> anyhow::Result<u32> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|u| u.parse().ok())
            .ok_or_else(|| anyhow!("no Uid in /proc/{}/status", self.pid))
    }
}

impl Drop for IdleHolder {
    fn drop(&mut self) {
        // SAFETY: our own child and pipe end.
        unsafe {
            libc::close(self.hold_w);
            libc::kill(self.pid, libc::SIGKILL);
            libc::waitpid(self.pid, std::ptr::null_mut(), 0);
        }
    }
}

/// One sample of an OpenMetrics body.
fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

fn scrape(lab: &Lab) -> anyhow::Result<String> {
    let response = netns::http_get(&lab.server, METRICS.into(), "/metrics", Duration::from_secs(5))?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("not an HTTP response: {response:?}"))?;
    ensure!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    Ok(body.to_string())
}

/// `aqd status --json` answered by the daemon (not the offline fallback) within 2 s; returns how long it took.
fn status_within_2s(lab: &Lab) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let out = lab
        .aqd_timeout(&["status", "--json"], Duration::from_secs(2))?
        .ok()?;
    let took = started.elapsed();
    let status = out.json()?;
    ensure!(
        status["daemon"]["running"] == true,
        "`aqd status` was not answered by the daemon: {status}"
    );
    ensure!(took < Duration::from_secs(2), "`aqd status` took {took:?}");
    Ok(took)
}

/// The daemon is the one that was started, and is still running.
fn assert_same_daemon(lab: &mut Lab, pid: u32) -> anyhow::Result<()> {
    if let Some(status) = lab.daemon_exit_status()? {
        bail!(
            "the daemon exited with {status}:\n{}",
            lab.daemon_log(lab.daemons_started())
        );
    }
    ensure!(lab.daemon_pid() == Some(pid), "the daemon's pid changed");
    ensure!(Path::new(&format!("/proc/{pid}")).exists(), "pid {pid} is gone");
    Ok(())
}

/// Connects `n` control clients that send nothing.
fn idle_control_clients(socket: &Path, n: usize) -> anyhow::Result<Vec<UnixStream>> {
    (0..n)
        .map(|i| UnixStream::connect(socket).with_context(|| format!("idle control client {i}")))
        .collect()
}

/// Clients that each send a request line larger than the daemon accepts, then read what comes back (an error
/// reply, or nothing if the daemon closed them at the cap). Each thread ends within its timeouts.
fn oversized_control_clients(socket: &Path, n: usize) -> Vec<thread::JoinHandle<&'static str>> {
    let payload: Arc<Vec<u8>> = Arc::new(vec![b'x'; detector_user::control::MAX_REQUEST_BYTES + 4096]);
    (0..n)
        .map(|_| {
            let socket: PathBuf = socket.to_path_buf();
            let payload = Arc::clone(&payload);
            thread::spawn(move || {
                let Ok(mut s) = UnixStream::connect(&socket) else {
                    return "connect failed";
                };
                let _ = s.set_write_timeout(Some(Duration::from_secs(20)));
                let _ = s.set_read_timeout(Some(Duration::from_secs(20)));
                if s.write_all(&payload).is_err() {
                    return "closed while sending";
                }
                let mut reply = String::new();
                match s.read_to_string(&mut reply) {
                    Ok(_) if reply.contains("request larger than") => "refused as oversized",
                    Ok(_) => "closed",
                    Err(_) => "read error",
                }
            })
        })
        .collect()
}

#[test]
fn the_control_plane_holds_under_abuse() -> anyhow::Result<()> {
    let Some(mut lab) = netns::lab_for_test() else {
        return Ok(());
    };
    lab.write_config(&format!("metrics_address = \"{METRICS}\""), "")?;
    lab.start_daemon()?;
    let pid = lab.daemon_pid().context("daemon pid")?;
    // As under systemd's default soft limit, and the daemon cannot raise it (hard = soft).
    set_nofile(pid, NOFILE)?;
    let fds_before = open_fds(pid)?;

    // A reply of a few MB (far more than a Unix socket buffers) for the client that never reads.
    let entries: String = (0..20_000u32)
        .map(|i| format!("100.{}.{}.{}\n", 64 + (i >> 16), (i >> 8) & 0xff, i & 0xff))
        .collect();
    let file = lab.file("bulk.txt");
    std::fs::write(&file, entries)?;
    lab.aqd_timeout(
        &["import", file.to_str().expect("utf-8"), "--into", "block"],
        Duration::from_secs(60),
    )?
    .ok()?;
    let mut never_reads = UnixStream::connect(lab.socket())?;
    never_reads.write_all(b"{\"version\":1,\"cmd\":\"list\",\"what\":\"decisions\"}\n")?;
    let never_reads_since = Instant::now();

    let holder = IdleHolder::start(&lab, METRICS, 1000)?;
    ensure!(
        holder.uid()? == NOBODY,
        "the holder runs as uid {}",
        holder.uid()?
    );
    let idle = idle_control_clients(&lab.socket(), 300)?;
    let oversized = oversized_control_clients(&lab.socket(), 20);

    let mut took = Vec::new();
    for _ in 0..3 {
        took.push(status_within_2s(&lab)?);
        assert_same_daemon(&mut lab, pid)?;
    }
    let blocked = "198.51.100.77";
    lab.aqd(&["block", blocked, "--reason", "abuse test"])?.ok()?;
    let list = lab.aqd(&["list", "--json"])?.ok()?.json()?;
    let decisions = list["decisions"]
        .as_array()
        .ok_or_else(|| anyhow!("no decisions in {list}"))?;
    ensure!(
        decisions
            .iter()
            .any(|d| d["net"].as_str().is_some_and(|n| n.starts_with(blocked)) && d["action"] == "block"),
        "{blocked} is not blocked after `aqd block`"
    );
    took.push(status_within_2s(&lab)?);

    let fds_during = open_fds(pid)?;
    let body = scrape(&lab)?;
    let get = |series: &str| sample(&body, series).ok_or_else(|| anyhow!("no {series} in\n{body}"));
    let metrics_evicted = get(r#"aqd_server_connections_total{server="metrics",outcome="evicted_idle"}"#)?;
    let control_evicted = get(r#"aqd_server_connections_total{server="control",outcome="evicted_idle"}"#)?;
    let metrics_active = get(r#"aqd_server_connections_active{server="metrics"}"#)?;
    let control_active = get(r#"aqd_server_connections_active{server="control"}"#)?;
    eprintln!(
        "status took {took:?}; daemon fds: {fds_before} at start, {fds_during} under abuse (limit {NOFILE}); \
         evicted idle: metrics {metrics_evicted}, control {control_evicted}; active: metrics {metrics_active}, \
         control {control_active}"
    );
    // 1,000 idle metrics connections against a cap of 32: all but the cap were closed to make room.
    ensure!(
        metrics_evicted >= 1000.0 - 32.0,
        "metrics evictions {metrics_evicted}"
    );
    ensure!(metrics_active <= 32.0 && control_active <= 64.0, "over the caps");
    ensure!(
        control_evicted >= 300.0 - 64.0,
        "control evictions {control_evicted}"
    );
    ensure!(
        (fds_during as u64) < NOFILE / 2,
        "the daemon holds {fds_during} descriptors"
    );

    let outcomes: Vec<&str> = oversized
        .into_iter()
        .map(|t| t.join().expect("oversized client thread"))
        .collect();
    eprintln!("oversized clients: {outcomes:?}");
    assert_same_daemon(&mut lab, pid)?;
    status_within_2s(&lab)?;

    // The client that never read: dropped at the write deadline, so what it finally reads is a cut-off reply.
    let wait = WRITE_DEADLINE_AND_SLACK.saturating_sub(never_reads_since.elapsed());
    thread::sleep(wait);
    never_reads.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut got = Vec::new();
    let _ = never_reads.read_to_end(&mut got);
    ensure!(
        !got.is_empty() && !got.ends_with(b"\n"),
        "the client that never read should get a cut-off reply (connection dropped), got {} bytes",
        got.len()
    );
    // (No check on the `timed_out` counter here: the idle clients reach their read deadline in the same
    // window, so it would count them whatever happened to the non-reader; the cut-off reply above is the test.)
    drop(idle);
    drop(holder);
    assert_same_daemon(&mut lab, pid)?;
    status_within_2s(&lab)?;
    Ok(())
}

/// Out of descriptors: `accept` fails with EMFILE. The control server logs it, sheds idle clients, retries, and
/// serves again — before the fix, the first failed `accept` ended it for good and the CLI fell back to writing
/// the pins itself.
#[test]
fn accept_errors_do_not_end_the_control_server() -> anyhow::Result<()> {
    let Some(mut lab) = netns::lab_for_test() else {
        return Ok(());
    };
    // A cap far above the descriptors left, so `accept` itself runs out.
    lab.write_config("control_max_connections = 4096", "")?;
    lab.start_daemon()?;
    let pid = lab.daemon_pid().context("daemon pid")?;
    let limit = open_fds(pid)? as u64 + 8;
    set_nofile(pid, limit)?;
    let idle = idle_control_clients(&lab.socket(), 40)?;
    let log = lab.wait_for_daemon_log(lab.daemons_started(), "accept failed", Duration::from_secs(10))?;
    ensure!(
        log.contains("Too many open files"),
        "the accept error should name EMFILE:\n{log}"
    );
    assert_same_daemon(&mut lab, pid)?;
    drop(idle);
    // Descriptors back: the same server answers again (status goes through the socket, not the fallback).
    status_within_2s(&lab)?;
    let reply = {
        let mut s = UnixStream::connect(lab.socket())?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"{\"version\":1,\"cmd\":\"status\"}\n")?;
        let mut reply = String::new();
        s.read_to_string(&mut reply)?;
        serde_json::from_str::<Value>(&reply).with_context(|| format!("reply {reply:?}"))?
    };
    ensure!(reply["ok"] == true, "{reply}");
    assert_same_daemon(&mut lab, pid)?;
    Ok(())
}

/// The purge walks the maps on its own handles (no lock) and removes in small steps, re-checking each entry: one
/// rewritten with a fresh TTL since the walk is kept. Also measures what the walk costs (all of which used to be
/// spent holding the daemon's state lock) against the longest removal step (what the lock is held for now).
#[test]
fn the_purge_walks_on_its_own_handles_and_keeps_what_was_rewritten() -> anyhow::Result<()> {
    use detector_common::{Action, Origin};
    use detector_user::{
        clock,
        loader::{self, LoadOptions},
        maps::{KernelMaps, List},
    };
    const N: u32 = 20_000;
    /// As the daemon's `PURGE_STEP`.
    const STEP: usize = 64;
    let Some(lab) = netns::lab_for_test() else {
        return Ok(());
    };
    let mut ebpf = loader::load(&LoadOptions {
        pin_dir: Some(lab.pin_dir()),
        test_clock: false,
    })?;
    let mut writer = KernelMaps::from_ebpf(&mut ebpf)?;
    let walker = KernelMaps::from_pins(&lab.pin_dir())?;
    let net = |i: u32| -> ipnet::IpNet {
        ipnet::Ipv4Net::new(Ipv4Addr::from(0x6440_0000 + i), 32)
            .expect("a /32")
            .into()
    };
    let short = Some(Duration::from_secs(1));
    for i in 0..N {
        writer.decision_insert(net(i), Action::Block, 0, 0, Origin::Cli, short)?;
    }
    let permanent: ipnet::IpNet = "198.51.100.9/32".parse()?;
    writer.decision_insert(permanent, Action::Block, 0, 0, Origin::Cli, None)?;
    writer.list_insert(List::Deny, "203.0.113.0/24".parse()?, short)?;
    writer.list_insert(List::Allow, "198.51.100.10/32".parse()?, short)?;
    thread::sleep(Duration::from_millis(1200));

    let now = clock::monotonic_ns();
    let started = Instant::now();
    let expired = walker.expired_entries(now);
    let walked = started.elapsed();
    ensure!(
        expired.len() == N as usize + 2,
        "found {} expired entries, expected {}",
        expired.len(),
        N + 2
    );
    // Rewritten after the walk found it: must survive.
    writer.decision_insert(
        net(7),
        Action::Block,
        0,
        0,
        Origin::Cli,
        Some(Duration::from_secs(600)),
    )?;
    let (mut removed, mut longest) = (0, Duration::ZERO);
    let removing = Instant::now();
    for step in expired.chunks(STEP) {
        let t = Instant::now();
        for entry in step {
            removed += writer.remove_if_expired(entry, now)? as usize;
        }
        longest = longest.max(t.elapsed());
    }
    eprintln!(
        "purge of {} expired entries: walk {walked:?} (no lock), removals {:?} in all, longest step of {STEP} \
         removals {longest:?} (the lock hold now; before, walk and all removals were one hold)",
        expired.len(),
        removing.elapsed()
    );
    ensure!(removed == N as usize + 1, "removed {removed}");
    let left: Vec<String> = walker.decisions()?.iter().map(|d| d.net.to_string()).collect();
    ensure!(
        left.len() == 2 && left.contains(&net(7).to_string()) && left.contains(&permanent.to_string()),
        "decisions left: {left:?}"
    );
    ensure!(
        walker.list_entries(List::Deny)?.is_empty() && walker.list_entries(List::Allow)?.is_empty(),
        "expired list entries left"
    );
    drop((writer, walker, ebpf));
    Ok(())
}

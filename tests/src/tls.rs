//! Real TLS traffic for the end-to-end fingerprint tests: a TLS/HTTP server in a lab's server namespace, real
//! clients (curl, `openssl s_client`, Python `ssl` + `http.client`) in its client namespace, packet captures with
//! tcpdump, and the offline fingerprints of a capture (`aqd fingerprint --json`).
//!
//! - The server ([`TlsServer`]) is a small Python `ssl` + `http.server` script with a self-signed ECDSA
//!   certificate for [`SERVER_NAME`]. It waits [`TlsServer::delay`] before its ServerHello and again before each
//!   HTTP response, so that a handshake and a request take a realistic round trip (this kernel has no netem),
//!   and logs every accepted connection, handshake and request as a JSON line ([`ServerEvent`]).
//! - Clients name the server as [`SERVER_NAME`] (SNI) and reach it by address (curl `--resolve`, s_client
//!   `-servername`, Python's `server_hostname`), verify its certificate, and are bounded in time: each attempt
//!   ends by itself (curl `--max-time`, a timeout around s_client, Python socket timeouts).
//! - Every process started here gets `PR_SET_PDEATHSIG`, is stopped by `Drop`, and writes only inside the lab's
//!   directory.
//!
//! Needs curl, openssl, python3 and tcpdump ([`missing_tools`]); `cargo xtask bootstrap` installs them.

use std::{
    fs::{self, File},
    io::{self, Read as _, Write as _},
    net::{IpAddr, SocketAddr},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail, ensure};
use serde_json::Value;

use crate::netns::{CmdOutput, Lab, Netns, run_bounded};

/// The TLS server's name: its certificate's subject and SAN, and the SNI every client sends.
pub const SERVER_NAME: &str = "aqd-test";
/// The server's default delay before its ServerHello and before each HTTP response.
pub const DEFAULT_DELAY: Duration = Duration::from_millis(30);
/// The body of every HTTP response.
pub const RESPONSE_BODY: &str = "aqd-test ok\n";
/// How long the server and tcpdump may take to start.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a helper command (openssl req, aqd fingerprint, tcpdump -r) may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);

/// The external programs these helpers run.
pub const TOOLS: [&str; 4] = ["curl", "openssl", "python3", "tcpdump"];

/// The Python the server and the Python client run: Debian's (`/usr/bin/python3`, which bootstrap installs)
/// when it is there, so that a user's own Python on `PATH` (pyenv, …) does not change the client's JA4.
pub fn python_bin() -> &'static str {
    if Path::new("/usr/bin/python3").is_file() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// The tools of [`TOOLS`] not found on `PATH`.
pub fn missing_tools() -> Vec<&'static str> {
    missing_from_path(&TOOLS)
}

/// The tools of `tools` not found on `PATH`.
pub fn missing_from_path(tools: &[&'static str]) -> Vec<&'static str> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    tools
        .iter()
        .copied()
        .filter(|tool| !std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
        .collect()
}

/// Spawns `cmd` so that it dies with the thread that started it (a test killed mid-run leaves nothing behind).
pub fn spawn_tied(cmd: &mut Command) -> io::Result<Child> {
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
}

fn signal(child: &Child, sig: libc::c_int) -> io::Result<()> {
    let pid = libc::pid_t::try_from(child.id()).map_err(io::Error::other)?;
    // SAFETY: our own child, not reaped yet.
    if unsafe { libc::kill(pid, sig) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Waits up to `timeout` for `child`; kills it (SIGKILL) if it is still running then. Returns whether it exited
/// by itself.
fn wait_or_kill(child: &mut Child, timeout: Duration) -> io::Result<bool> {
    let deadline = Instant::now() + timeout;
    loop {
        if child.try_wait()?.is_some() {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            child.wait()?;
            return Ok(false);
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Polls `path` until its text contains `needle`.
fn wait_for_text(path: &Path, needle: &str, timeout: Duration, child: &mut Child) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let text = fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("exited with {status} before printing {needle:?}:\n{text}");
        }
        if Instant::now() >= deadline {
            bail!("did not print {needle:?} within {timeout:?}:\n{text}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Bounded commands with input
// ---------------------------------------------------------------------------------------------------------------

/// A command that ran to its end or was killed at its time limit.
#[derive(Clone, Debug)]
pub struct Bounded {
    pub output: CmdOutput,
    /// Killed at the time limit.
    pub timed_out: bool,
    pub elapsed: Duration,
}

/// Runs `cmd` with `input` on its stdin (then closed), killing it after `timeout`; never an error for a
/// non-zero exit or a timeout (the caller judges), only for a failure to start it.
pub fn run_with_input(mut cmd: Command, input: &[u8], timeout: Duration) -> anyhow::Result<Bounded> {
    let what = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    let started = Instant::now();
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = spawn_tied(&mut cmd).with_context(|| format!("spawning `{what}`"))?;
    let mut stdin = child.stdin.take();
    let input = input.to_vec();
    let writer = thread::spawn(move || {
        if let Some(pipe) = stdin.as_mut() {
            let _ = pipe.write_all(&input);
        }
        // Dropping the pipe closes it.
    });
    let read = |pipe: Option<Box<dyn io::Read + Send>>| {
        thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut bytes);
            }
            String::from_utf8_lossy(&bytes).into_owned()
        })
    };
    let out = read(child.stdout.take().map(|p| Box::new(p) as _));
    let err = read(child.stderr.take().map(|p| Box::new(p) as _));
    let exited = wait_or_kill(&mut child, timeout)?;
    let status = child.wait()?;
    let _ = writer.join();
    Ok(Bounded {
        output: CmdOutput {
            what,
            code: status.code(),
            stdout: out.join().unwrap_or_default(),
            stderr: err.join().unwrap_or_default(),
        },
        timed_out: !exited,
        elapsed: started.elapsed(),
    })
}

// ---------------------------------------------------------------------------------------------------------------
// The server
// ---------------------------------------------------------------------------------------------------------------

/// The TLS/HTTP server: argv = cert key port delay_ms log_path. Listens dual-stack on `[::]:port`.
const SERVER_PY: &str = r#"
import json, socket, ssl, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

cert, key, port, delay_ms, log_path = sys.argv[1:6]
delay = float(delay_ms) / 1000.0
log = open(log_path, "a", buffering=1)
lock = threading.Lock()

def event(kind, peer, **fields):
    record = {"event": kind, "peer": peer[0], "port": peer[1], "t": time.time()}
    record.update(fields)
    with lock:
        log.write(json.dumps(record) + "\n")

def plain(addr):
    return addr[7:] if addr.startswith("::ffff:") else addr

ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
ctx.set_alpn_protocols(["http/1.1"])

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        event("request", self.client_address, path=self.path)
        time.sleep(delay)
        body = b"aqd-test ok\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def log_message(self, *args):
        pass

class Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True
    request_queue_size = 128

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def finish_request(self, request, client_address):
        peer = (plain(client_address[0]), client_address[1])
        event("accept", peer)
        request.settimeout(5)
        # One round trip before the ServerHello (and so before the client's request can come).
        time.sleep(delay)
        try:
            tls = ctx.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError) as e:
            event("handshake_failed", peer, error=str(e))
            return
        try:
            event("handshake", peer, version=tls.version(), cipher=tls.cipher()[0],
                  alpn=tls.selected_alpn_protocol())
            self.RequestHandlerClass(tls, peer, self)
        except (OSError, ssl.SSLError) as e:
            event("error", peer, error=str(e))
        finally:
            tls.close()

    def handle_error(self, request, client_address):
        pass

server = Server(("::", int(port)), Handler)
print("ready", flush=True)
server.serve_forever()
"#;

/// One line of the server's log.
#[derive(Clone, Debug, PartialEq)]
pub struct ServerEvent {
    /// `accept`, `handshake`, `handshake_failed`, `request` or `error`.
    pub event: String,
    pub peer: IpAddr,
    pub port: u16,
    pub json: Value,
}

/// The TLS server running in a lab's server namespace; stopped on drop.
pub struct TlsServer {
    child: Option<Child>,
    pub addr: SocketAddr,
    /// Also listening on this address (the other family).
    pub addr_v6: SocketAddr,
    pub cert: PathBuf,
    pub delay: Duration,
    log: PathBuf,
    output: PathBuf,
}

/// A self-signed ECDSA certificate for [`SERVER_NAME`] (one day), as `(cert.pem, key.pem)` in `dir`.
pub fn self_signed_cert(dir: &std::path::Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let mut req = Command::new("openssl");
    req.args([
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "1",
        "-subj",
    ])
    .arg(format!("/CN={SERVER_NAME}"))
    .arg("-addext")
    .arg(format!("subjectAltName=DNS:{SERVER_NAME}"))
    .arg("-keyout")
    .arg(&key)
    .arg("-out")
    .arg(&cert);
    run_bounded(req, COMMAND_TIMEOUT)?.ok()?;
    Ok((cert, key))
}

impl TlsServer {
    /// Makes a certificate for [`SERVER_NAME`] and starts the server on `port` of the lab's server addresses.
    pub fn start(lab: &Lab, port: u16, delay: Duration) -> anyhow::Result<Self> {
        let dir = lab.file("tls");
        fs::create_dir_all(&dir)?;
        let (cert, key) = self_signed_cert(&dir)?;
        let script = dir.join("server.py");
        fs::write(&script, SERVER_PY)?;
        let log = dir.join("server-events.jsonl");
        let output = dir.join("server-output.txt");
        let out = File::create(&output)?;
        let mut cmd = lab.server.command(python_bin());
        cmd.arg("-u")
            .arg(&script)
            .arg(&cert)
            .arg(&key)
            .arg(port.to_string())
            .arg(delay.as_millis().to_string())
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let child = spawn_tied(&mut cmd).context("spawning the TLS server")?;
        let mut server = Self {
            child: Some(child),
            addr: SocketAddr::new(lab.server_v4.into(), port),
            addr_v6: SocketAddr::new(lab.server_v6.into(), port),
            cert,
            delay,
            log,
            output,
        };
        let child = server.child.as_mut().expect("just started");
        wait_for_text(&server.output, "ready", START_TIMEOUT, child).context("starting the TLS server")?;
        Ok(server)
    }

    /// Everything the server logged so far.
    pub fn events(&self) -> anyhow::Result<Vec<ServerEvent>> {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        text.lines()
            .map(|line| {
                let json: Value =
                    serde_json::from_str(line).with_context(|| format!("server log line {line:?}"))?;
                Ok(ServerEvent {
                    event: json["event"].as_str().unwrap_or_default().to_string(),
                    peer: json["peer"]
                        .as_str()
                        .and_then(|p| p.parse().ok())
                        .ok_or_else(|| anyhow!("no peer in {line}"))?,
                    port: json["port"].as_u64().unwrap_or(0) as u16,
                    json,
                })
            })
            .collect()
    }

    /// The server's stdout and stderr (for failure messages).
    pub fn output(&self) -> String {
        fs::read_to_string(&self.output).unwrap_or_default()
    }

    /// Stops the server (SIGTERM, then SIGKILL).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = signal(&child, libc::SIGTERM);
            let _ = wait_or_kill(&mut child, Duration::from_secs(2));
        }
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------------------------------

/// The Python client: one `http.client.HTTPSConnection` per attempt, as the library sets it up without a context
/// of its own (default context, ALPN `http/1.1`, post-handshake auth), but trusting the test certificate, naming
/// the server by SNI and reaching it by address. Prints one JSON object per attempt.
const CLIENT_PY: &str = r#"
import argparse, http.client, json, socket, ssl, time

p = argparse.ArgumentParser()
p.add_argument("--ip"); p.add_argument("--port", type=int); p.add_argument("--sni")
p.add_argument("--cafile"); p.add_argument("--count", type=int, default=1)
p.add_argument("--timeout", type=float, default=3.0); p.add_argument("--source")
p.add_argument("--mss", type=int, default=0)
a = p.parse_args()

def connect(address, timeout, source_address):
    family = socket.AF_INET6 if ":" in a.ip else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(timeout)
    if a.mss:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, a.mss)
    if a.source:
        s.bind((a.source, 0))
    s.connect((a.ip, a.port))
    return s

for i in range(a.count):
    ctx = ssl.create_default_context(cafile=a.cafile)
    ctx.set_alpn_protocols(["http/1.1"])
    if ctx.post_handshake_auth is not None:
        ctx.post_handshake_auth = True
    conn = http.client.HTTPSConnection(a.sni, a.port, context=ctx, timeout=a.timeout)
    conn._create_connection = connect
    start = time.monotonic()
    result = {"attempt": i}
    try:
        conn.connect()
        result["local_port"] = conn.sock.getsockname()[1]
        conn.request("GET", "/", headers={"Connection": "close"})
        response = conn.getresponse()
        result["status"] = response.status
        result["body"] = response.read().decode("utf-8", "replace")
    except Exception as e:
        result["error"] = "%s: %s" % (type(e).__name__, e)
    finally:
        result["elapsed_ms"] = round((time.monotonic() - start) * 1000, 1)
        conn.close()
    print(json.dumps(result), flush=True)
"#;

/// A TLS client library/program.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Client {
    Curl,
    OpensslSClient,
    Python,
}

impl Client {
    pub const ALL: [Client; 3] = [Client::Curl, Client::OpensslSClient, Client::Python];

    pub fn name(self) -> &'static str {
        match self {
            Client::Curl => "curl",
            Client::OpensslSClient => "openssl s_client",
            Client::Python => "python ssl/http.client",
        }
    }
}

impl std::fmt::Display for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How one client attempt is made.
#[derive(Clone, Debug)]
pub struct Attempt {
    /// The server (its address and port).
    pub to: SocketAddr,
    /// Source address to bind (the client namespace's primary address when `None`).
    pub source: Option<IpAddr>,
    /// The whole attempt's time limit.
    pub max_time: Duration,
    /// The TCP connect's time limit (curl `--connect-timeout`; the others use `max_time`).
    pub connect_timeout: Duration,
    /// TCP_MAXSEG before connect (Python only): a smaller MSS splits the ClientHello over segments.
    pub mss: Option<u32>,
}

impl Attempt {
    pub fn to(to: SocketAddr) -> Self {
        Self {
            to,
            source: None,
            max_time: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(3),
            mss: None,
        }
    }

    pub fn from(mut self, source: IpAddr) -> Self {
        self.source = Some(source);
        self
    }

    pub fn max_time(mut self, max_time: Duration) -> Self {
        self.max_time = max_time;
        self.connect_timeout = self.connect_timeout.min(max_time);
        self
    }

    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    pub fn mss(mut self, mss: u32) -> Self {
        self.mss = Some(mss);
        self
    }
}

/// What one client attempt got.
#[derive(Clone, Debug)]
pub struct ClientRun {
    pub client: Client,
    /// An HTTP 200 with the server's body arrived.
    pub responded: bool,
    /// The local port, where the client reports it (curl, Python).
    pub local_port: Option<u16>,
    pub elapsed: Duration,
    /// The client's own account (exit code, error, output) for messages.
    pub detail: String,
}

/// `host:port` with brackets for IPv6.
fn host_port(addr: SocketAddr) -> String {
    match addr.ip() {
        IpAddr::V4(ip) => format!("{ip}:{}", addr.port()),
        IpAddr::V6(ip) => format!("[{ip}]:{}", addr.port()),
    }
}

/// Runs `count` attempts of `client` from the lab's client namespace against `server`, one after the other.
pub fn run_client(
    lab: &Lab,
    server: &TlsServer,
    client: Client,
    attempt: &Attempt,
    count: usize,
) -> anyhow::Result<Vec<ClientRun>> {
    match client {
        Client::Curl => (0..count).map(|_| curl(&lab.client, server, attempt)).collect(),
        Client::OpensslSClient => (0..count)
            .map(|_| s_client(&lab.client, server, attempt))
            .collect(),
        Client::Python => python(lab, server, attempt, count),
    }
}

fn curl(ns: &Netns, server: &TlsServer, attempt: &Attempt) -> anyhow::Result<ClientRun> {
    let mut cmd = ns.command("curl");
    cmd.args(["-sS", "-o", "-"])
        .arg("--cacert")
        .arg(&server.cert)
        .arg("--resolve")
        .arg(match attempt.to.ip() {
            IpAddr::V4(ip) => format!("{SERVER_NAME}:{}:{ip}", attempt.to.port()),
            IpAddr::V6(ip) => format!("{SERVER_NAME}:{}:[{ip}]", attempt.to.port()),
        })
        .arg("--max-time")
        .arg(format!("{:.3}", attempt.max_time.as_secs_f64()))
        .arg("--connect-timeout")
        .arg(format!("{:.3}", attempt.connect_timeout.as_secs_f64()))
        .args(["-w", "\n%{http_code} %{local_port}\n"]);
    if let Some(source) = attempt.source {
        cmd.arg("--interface").arg(source.to_string());
    }
    cmd.arg(format!("https://{SERVER_NAME}:{}/", attempt.to.port()));
    let run = run_with_input(cmd, b"", attempt.max_time + Duration::from_secs(2))?;
    let last = run.output.stdout.lines().last().unwrap_or_default().to_string();
    let mut fields = last.split_whitespace();
    let code = fields.next().unwrap_or_default();
    let local_port = fields.next().and_then(|p| p.parse().ok()).filter(|p| *p != 0);
    Ok(ClientRun {
        client: Client::Curl,
        responded: run.output.success() && code == "200" && run.output.stdout.contains(RESPONSE_BODY),
        local_port,
        elapsed: run.elapsed,
        detail: format!("exit {:?}, {}", run.output.code, run.output.stderr.trim()),
    })
}

fn s_client(ns: &Netns, server: &TlsServer, attempt: &Attempt) -> anyhow::Result<ClientRun> {
    let mut cmd = ns.command("openssl");
    cmd.args(["s_client", "-quiet", "-verify_quiet", "-verify_return_error"])
        .arg("-connect")
        .arg(host_port(attempt.to))
        .args(["-servername", SERVER_NAME])
        .arg("-CAfile")
        .arg(&server.cert);
    if let Some(source) = attempt.source {
        cmd.arg("-bind").arg(host_port(SocketAddr::new(source, 0)));
    }
    let request = format!("GET / HTTP/1.1\r\nHost: {SERVER_NAME}\r\nConnection: close\r\n\r\n");
    let run = run_with_input(cmd, request.as_bytes(), attempt.max_time)?;
    let out = &run.output.stdout;
    Ok(ClientRun {
        client: Client::OpensslSClient,
        responded: out.starts_with("HTTP/1.1 200") && out.contains(RESPONSE_BODY),
        local_port: None,
        elapsed: run.elapsed,
        detail: if run.timed_out {
            format!("killed after {:?} (no answer)", attempt.max_time)
        } else {
            format!("exit {:?}, {}", run.output.code, run.output.stderr.trim())
        },
    })
}

fn python(lab: &Lab, server: &TlsServer, attempt: &Attempt, count: usize) -> anyhow::Result<Vec<ClientRun>> {
    let script = lab.file("tls/client.py");
    if !script.exists() {
        fs::write(&script, CLIENT_PY)?;
    }
    let mut cmd = lab.client.command(python_bin());
    cmd.arg(&script)
        .args(["--ip", &attempt.to.ip().to_string()])
        .args(["--port", &attempt.to.port().to_string()])
        .args(["--sni", SERVER_NAME])
        .arg("--cafile")
        .arg(&server.cert)
        .args(["--count", &count.to_string()])
        .args(["--timeout", &format!("{:.3}", attempt.max_time.as_secs_f64())]);
    if let Some(source) = attempt.source {
        cmd.args(["--source", &source.to_string()]);
    }
    if let Some(mss) = attempt.mss {
        cmd.args(["--mss", &mss.to_string()]);
    }
    // Each attempt's socket timeout bounds each blocking step; the whole run gets a generous limit.
    let limit = (attempt.max_time * 3 + Duration::from_secs(1)) * count as u32 + Duration::from_secs(5);
    let run = run_with_input(cmd, b"", limit)?;
    ensure!(
        !run.timed_out,
        "python client did not finish within {limit:?}: {}",
        run.output
    );
    let runs: Vec<ClientRun> = run
        .output
        .stdout
        .lines()
        .map(|line| {
            let json: Value =
                serde_json::from_str(line).with_context(|| format!("python client line {line:?}"))?;
            Ok(ClientRun {
                client: Client::Python,
                responded: json["status"] == 200 && json["body"] == RESPONSE_BODY,
                local_port: json["local_port"].as_u64().map(|p| p as u16),
                elapsed: Duration::from_secs_f64(json["elapsed_ms"].as_f64().unwrap_or(0.0) / 1000.0),
                detail: json["error"].as_str().unwrap_or("").to_string(),
            })
        })
        .collect::<anyhow::Result<_>>()?;
    ensure!(
        runs.len() == count,
        "python client reported {} of {count} attempts: {}",
        runs.len(),
        run.output
    );
    Ok(runs)
}

// ---------------------------------------------------------------------------------------------------------------
// Routes that change what the client's stack sends
// ---------------------------------------------------------------------------------------------------------------

/// Runs `ip -n <ns> <args>`.
pub fn ip_in(ns: &Netns, args: &[&str]) -> anyhow::Result<()> {
    let mut cmd = Command::new("ip");
    cmd.args(["-n", ns.name()]).args(args);
    run_bounded(cmd, COMMAND_TIMEOUT)?.ok()?;
    Ok(())
}

/// Makes connections from the client's `source` address to `server` advertise `advmss` in their SYN (policy
/// routing in the client namespace: a rule for `source` and a route with `advmss` in table `table`). The rest of
/// the client's traffic keeps the ordinary route, so its SYN signature is untouched: the same Linux stack in one
/// namespace then sends two distinct SYN signatures.
pub fn route_with_advmss(
    lab: &Lab,
    source: IpAddr,
    server: IpAddr,
    advmss: u32,
    table: u32,
) -> anyhow::Result<()> {
    let (table, advmss) = (table.to_string(), advmss.to_string());
    let family = if source.is_ipv4() { "-4" } else { "-6" };
    let (source, server) = (source.to_string(), server.to_string());
    ip_in(
        &lab.client,
        &[
            family, "rule", "add", "from", &source, "lookup", &table, "pref", "100",
        ],
    )?;
    ip_in(
        &lab.client,
        &[
            family,
            "route",
            "add",
            &server,
            "dev",
            crate::netns::CLIENT_IF,
            "src",
            &source,
            "advmss",
            &advmss,
            "table",
            &table,
        ],
    )
}

// ---------------------------------------------------------------------------------------------------------------
// Captures and offline fingerprints
// ---------------------------------------------------------------------------------------------------------------

/// tcpdump writing a pcap of one interface inside a namespace; stopped by [`Capture::stop`] or on drop.
pub struct Capture {
    child: Option<Child>,
    pub path: PathBuf,
    log: PathBuf,
}

impl Capture {
    /// Starts tcpdump on `iface` in `ns` with `filter`, writing to `path`; returns once it is capturing.
    pub fn start(ns: &Netns, iface: &str, filter: &str, path: PathBuf) -> anyhow::Result<Self> {
        let log = path.with_extension("tcpdump.log");
        let out = File::create(&log)?;
        let mut cmd = ns.command("tcpdump");
        // -Z root: Debian's tcpdump drops to its own user, which could not write into the lab's directory.
        cmd.args([
            "-i",
            iface,
            "-n",
            "-s",
            "0",
            "-U",
            "--immediate-mode",
            "-Z",
            "root",
            "-w",
        ])
        .arg(&path)
        .args(filter.split_whitespace())
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
        let child = spawn_tied(&mut cmd).context("spawning tcpdump")?;
        let mut capture = Self {
            child: Some(child),
            path,
            log,
        };
        let child = capture.child.as_mut().expect("just started");
        wait_for_text(&capture.log, "listening on", START_TIMEOUT, child).context("starting tcpdump")?;
        Ok(capture)
    }

    /// Stops tcpdump (SIGINT: it writes out what it has) and returns the pcap's path.
    pub fn stop(mut self) -> anyhow::Result<PathBuf> {
        // Segments the test's last client sent may still be on their way through the veth.
        thread::sleep(Duration::from_millis(100));
        let mut child = self.child.take().expect("running");
        let signalled = signal(&child, libc::SIGINT);
        let clean = wait_or_kill(&mut child, Duration::from_secs(5))?;
        signalled?;
        ensure!(
            clean,
            "tcpdump ignored SIGINT: {}",
            fs::read_to_string(&self.log).unwrap_or_default()
        );
        Ok(self.path.clone())
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = signal(&child, libc::SIGINT);
            let _ = wait_or_kill(&mut child, Duration::from_secs(2));
        }
    }
}

/// One ClientHello of an offline capture (`aqd fingerprint --json`, `type` `client_hello`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OfflineHello {
    pub src: IpAddr,
    pub srcport: u16,
    pub ja4: String,
    pub ja4_r: String,
    pub sni: Option<String>,
}

/// One client SYN of an offline capture (`type` `syn`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OfflineSyn {
    pub src: IpAddr,
    pub srcport: u16,
    pub signature: String,
    pub label: Option<String>,
    /// The kernel verdict map's key, hex.
    pub key: String,
}

/// What `aqd fingerprint --json` found in a capture.
#[derive(Clone, Debug, Default)]
pub struct Offline {
    pub hellos: Vec<OfflineHello>,
    pub syns: Vec<OfflineSyn>,
}

/// The p0f database of the shared test data, if it is there.
pub fn p0f_db() -> Option<PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/testdata/p0f/p0f.fp");
    path.is_file().then_some(path)
}

/// Runs `aqd fingerprint --json` on `pcap` (with the shared p0f database when there is one).
pub fn offline_fingerprints(lab: &Lab, pcap: &Path) -> anyhow::Result<Offline> {
    let mut args = vec!["fingerprint".to_string(), "--json".to_string()];
    if let Some(db) = p0f_db() {
        args.push("--p0f-db".into());
        args.push(db.to_string_lossy().into_owned());
    }
    args.push(pcap.to_string_lossy().into_owned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = lab.aqd_outside(&args)?.ok()?;
    let mut offline = Offline::default();
    for line in out.stdout.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value =
            serde_json::from_str(line).with_context(|| format!("aqd fingerprint line {line:?}"))?;
        let s = |k: &str| {
            v[k].as_str()
                .map(String::from)
                .ok_or_else(|| anyhow!("no {k} in {line}"))
        };
        let src: IpAddr = s("src")?.parse()?;
        let srcport = v["srcport"]
            .as_u64()
            .ok_or_else(|| anyhow!("no srcport in {line}"))? as u16;
        match v["type"].as_str() {
            Some("client_hello") => offline.hellos.push(OfflineHello {
                src,
                srcport,
                ja4: s("ja4")?,
                ja4_r: s("ja4_r")?,
                sni: v["sni"].as_str().map(String::from),
            }),
            Some("syn") => offline.syns.push(OfflineSyn {
                src,
                srcport,
                signature: s("signature")?,
                label: v["label"].as_str().map(String::from),
                key: s("key")?,
            }),
            other => bail!("unknown record type {other:?}: {line}"),
        }
    }
    Ok(offline)
}

/// The payload lengths of the client's data segments towards `port` in `pcap`, per client port, in capture
/// order (from `tcpdump -r`): shows how a ClientHello was cut into segments.
pub fn client_segments(pcap: &Path, port: u16) -> anyhow::Result<Vec<(u16, Vec<usize>)>> {
    let mut cmd = Command::new("tcpdump");
    cmd.args(["-r"])
        .arg(pcap)
        .args(["-n", "-q", "tcp", "dst", "port", &port.to_string()]);
    let out = run_bounded(cmd, COMMAND_TIMEOUT)?.ok()?;
    let mut flows: Vec<(u16, Vec<usize>)> = Vec::new();
    for line in out.stdout.lines() {
        // "12:00:00.000000 IP 10.1.2.1.40000 > 10.1.2.2.8443: tcp 517"
        let mut words = line.split_whitespace();
        let Some(src) = words.nth(2) else { continue };
        let Some(len) = line.rsplit(' ').next().and_then(|l| l.parse::<usize>().ok()) else {
            continue;
        };
        let Some(sport) = src.rsplit('.').next().and_then(|p| p.parse::<u16>().ok()) else {
            continue;
        };
        if len == 0 {
            continue;
        }
        match flows.iter_mut().find(|(p, _)| *p == sport) {
            Some((_, lens)) => lens.push(len),
            None => flows.push((sport, vec![len])),
        }
    }
    Ok(flows)
}

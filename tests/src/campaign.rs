//! Campaign traffic for the model's end-to-end test: many client source addresses in a lab, an HTTPS "AI API"
//! on the protected port, and one Python process that drives an extraction campaign and a few honest clients.
//!
//! - [`add_sources`] puts extra IPv4 addresses (`/32`) on the client's veth and routes their prefix from the
//!   server namespace back via the client's primary address (a static neighbour), so the server answers them
//!   without ARP.
//! - [`ApiServer`] is a Python `asyncio` + `ssl` HTTP/1.1 server (keep-alive, `POST` with `Content-Length`) with a
//!   self-signed certificate for [`crate::tls::SERVER_NAME`]; it waits a little before each response and logs
//!   every request as a JSON line.
//! - [`Drive`] runs one Python `asyncio` process in the client namespace: the **campaign** (every source the same
//!   client — one `ssl` context, so one JA4 — on a keep-alive connection bound to its own address, requests in
//!   lockstep rounds dispatched by one orchestrator, templated body sizes, far under any per-IP limit) and the
//!   **honest** clients (a few sources with another TLS configuration, so another JA4, their own Poisson rhythm,
//!   lognormal body sizes and reconnects; one of them may be curl, one process per request). Every request is
//!   recorded with its time and outcome ([`Outcome`]). After the handshake a client waits before its first
//!   request, so that the kernel sees the handshake's last flight and the request as separate bursts.
//!
//! Everything is bounded: the driver stops by itself after its duration or earlier when asked ([`Drive::stop`]),
//! and is killed if it overruns; each request and connect has a timeout; all traffic stays between the lab's two
//! namespaces.

use std::{
    fs::{self, File},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use serde_json::{Value, json};

use crate::{
    netns::{CLIENT_IF, Lab, SERVER_IF, run_bounded},
    tls::{SERVER_NAME, python_bin, spawn_tied},
};

/// How long a helper command (openssl req, ip -batch) may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the server may take to start.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// The tools this module runs.
pub const TOOLS: [&str; 4] = ["curl", "openssl", "python3", "ip"];

/// The tools of [`TOOLS`] not found on `PATH`.
pub fn missing_tools() -> Vec<&'static str> {
    crate::tls::missing_from_path(&TOOLS)
}

/// `count` addresses of `10.<second>.0.0/16` spread round-robin over the /24s `first_subnet..first_subnet +
/// subnets`, hosts from `.10` on.
pub fn spread(second: u8, first_subnet: u8, subnets: u8, count: usize) -> Vec<Ipv4Addr> {
    (0..count)
        .map(|i| {
            let subnet = first_subnet + (i % subnets as usize) as u8;
            let host = 10 + (i / subnets as usize) as u8;
            Ipv4Addr::new(10, second, subnet, host)
        })
        .collect()
}

/// Adds `addrs` (as /32s) to the client's veth and routes `route` (their covering prefix) in the server namespace
/// via the client's primary address, whose neighbour entry is static.
pub fn add_sources(lab: &Lab, addrs: &[Ipv4Addr], route: &str) -> anyhow::Result<()> {
    let batch = lab.file("client-addresses.batch");
    let text: String = addrs
        .iter()
        .map(|a| format!("address add {a}/32 dev {CLIENT_IF}\n"))
        .collect();
    fs::write(&batch, text)?;
    let mut cmd = Command::new("ip");
    cmd.args(["-n", lab.client.name(), "-batch"]).arg(&batch);
    run_bounded(cmd, COMMAND_TIMEOUT)?.ok()?;
    let mut cmd = Command::new("ip");
    cmd.args(["-n", lab.server.name(), "route", "add", route, "via"])
        .arg(lab.client_v4.to_string())
        .args(["dev", SERVER_IF]);
    run_bounded(cmd, COMMAND_TIMEOUT)?.ok()?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------------
// The server
// ---------------------------------------------------------------------------------------------------------------

/// argv = cert key addr port delay_ms log_path.
const SERVER_PY: &str = r#"
import asyncio, json, ssl, sys, time

cert, key, addr, port, delay_ms, log_path = sys.argv[1:7]
delay = float(delay_ms) / 1000.0
log = open(log_path, "a", buffering=1)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
ctx.set_alpn_protocols(["http/1.1"])

async def handle(reader, writer):
    peer = writer.get_extra_info("peername")[0]
    try:
        while True:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            length = 0
            for line in head.split(b"\r\n")[1:]:
                k, _, v = line.partition(b":")
                if k.strip().lower() == b"content-length":
                    length = int(v.strip())
            body = await reader.readexactly(length) if length else b""
            log.write(json.dumps({"peer": peer, "t": time.time(), "bytes": len(body)}) + "\n")
            await asyncio.sleep(delay)
            out = b"r" * (600 + len(body) // 2)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                         % len(out) + out)
            await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.TimeoutError, asyncio.LimitOverrunError, ConnectionError,
            ssl.SSLError, OSError, ValueError):
        pass
    finally:
        writer.transport.abort()

async def main():
    server = await asyncio.start_server(handle, addr, int(port), ssl=ctx, backlog=1024,
                                        ssl_handshake_timeout=10)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()

asyncio.run(main())
"#;

/// The HTTPS API server in the lab's server namespace; stopped on drop.
pub struct ApiServer {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub cert: PathBuf,
    log: PathBuf,
    output: PathBuf,
}

impl ApiServer {
    /// Makes a certificate for [`SERVER_NAME`] and starts the server on `port` of the lab's server IPv4 address.
    pub fn start(lab: &Lab, port: u16, delay: Duration) -> anyhow::Result<Self> {
        let dir = lab.file("api");
        fs::create_dir_all(&dir)?;
        let (cert, key) = crate::tls::self_signed_cert(&dir)?;
        let script = dir.join("server.py");
        fs::write(&script, SERVER_PY)?;
        let log = dir.join("requests.jsonl");
        let output = dir.join("server-output.txt");
        let out = File::create(&output)?;
        let addr = SocketAddr::new(lab.server_v4.into(), port);
        let mut cmd = lab.server.command(python_bin());
        cmd.arg("-u")
            .arg(&script)
            .arg(&cert)
            .arg(&key)
            .arg(addr.ip().to_string())
            .arg(port.to_string())
            .arg(delay.as_millis().to_string())
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let child = spawn_tied(&mut cmd).context("spawning the API server")?;
        let mut server = Self {
            child: Some(child),
            addr,
            cert,
            log,
            output,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if server.output().contains("ready") {
                return Ok(server);
            }
            if let Some(status) = server.child.as_mut().expect("started").try_wait()? {
                bail!("the API server exited with {status}:\n{}", server.output());
            }
            if Instant::now() >= deadline {
                bail!(
                    "the API server did not start within {START_TIMEOUT:?}:\n{}",
                    server.output()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Requests the server handled, per peer address.
    pub fn requests_by_peer(&self) -> std::collections::BTreeMap<IpAddr, u64> {
        let mut by = std::collections::BTreeMap::new();
        for line in fs::read_to_string(&self.log).unwrap_or_default().lines() {
            if let Some(peer) = serde_json::from_str::<Value>(line)
                .ok()
                .and_then(|v| v["peer"].as_str().and_then(|p| p.parse().ok()))
            {
                *by.entry(peer).or_insert(0) += 1;
            }
        }
        by
    }

    pub fn output(&self) -> String {
        fs::read_to_string(&self.output).unwrap_or_default()
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The clients
// ---------------------------------------------------------------------------------------------------------------

/// argv = config.json. Writes one JSON line per request to the config's `out`.
const DRIVER_PY: &str = r#"
import asyncio, json, math, os, random, ssl, sys, time

cfg = json.load(open(sys.argv[1]))
T0 = time.monotonic()
END = T0 + cfg["duration_s"]   # brought forward when the stop file appears

async def watch_stop():
    global END
    while time.monotonic() < END:
        if os.path.exists(cfg["stop_file"]):
            END = min(END, time.monotonic())
            return
        await asyncio.sleep(0.2)

async def sleep_until(t):
    # Sleeps in short steps, so that every client notices a stop within a quarter of a second.
    while True:
        now = time.monotonic()
        if now >= t or now >= END:
            return
        await asyncio.sleep(min(0.25, t - now))
out = open(cfg["out"], "w", buffering=1)
SNI, IP, PORT = cfg["sni"], cfg["server_ip"], cfg["port"]

def rec(role, src, t, ok, err="", size=0, conn=0):
    out.write(json.dumps({"role": role, "src": src, "t": round(t - T0, 3), "ok": ok, "err": err,
                          "size": size, "conn": conn}) + "\n")

def campaign_ctx():
    c = ssl.create_default_context(cafile=cfg["cafile"])
    c.set_alpn_protocols(["http/1.1"])
    return c

def honest_ctx():
    # Another TLS configuration (cipher list, no ALPN): another JA4.
    c = ssl.create_default_context(cafile=cfg["cafile"])
    c.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES256-GCM-SHA384")
    return c

class Conn:
    def __init__(self, src, ctx):
        self.src, self.ctx, self.r, self.w, self.n = src, ctx, None, None, 0

    async def open(self, timeout, settle):
        self.r, self.w = await asyncio.wait_for(
            asyncio.open_connection(IP, PORT, ssl=self.ctx, server_hostname=SNI, local_addr=(self.src, 0),
                                    ssl_handshake_timeout=timeout), timeout)
        self.n += 1
        # The handshake's last flight and the first request must be separate bursts (the kernel's gap is 50 ms).
        await asyncio.sleep(settle)

    def close(self):
        if self.w is not None:
            self.w.transport.abort()
        self.r = self.w = None

    async def request(self, size):
        head = ("POST /v1/chat/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                "Content-Length: %d\r\n\r\n" % (SNI, size)).encode()
        self.w.write(head + b"q" * size)
        await self.w.drain()
        resp = await self.r.readuntil(b"\r\n\r\n")
        length = 0
        for line in resp.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == b"content-length":
                length = int(v.strip())
        await self.r.readexactly(length)
        if not resp.startswith(b"HTTP/1.1 200"):
            raise RuntimeError("status " + resp.split(b"\r\n")[0].decode(errors="replace"))

async def campaign_source(i, src, ctx):
    c = cfg["campaign"]
    rnd = random.Random(c["seed"] * 7919 + i)
    conn = Conn(src, ctx)
    start = T0 + c["start_s"]
    await sleep_until(T0 + rnd.uniform(0, max(0.0, c["start_s"] - 1.0)))
    try:
        await conn.open(c["connect_timeout_s"], c["settle_s"])
    except Exception as e:
        rec("campaign", src, time.monotonic(), False, "connect:" + type(e).__name__, 0, conn.n)
        conn.close()
    while True:
        now = time.monotonic()
        k = max(0, math.ceil((now - start) / c["round_s"]))
        t = start + k * c["round_s"] + rnd.uniform(0, c["jitter_s"])
        await sleep_until(t)
        if time.monotonic() >= END:
            break
        if rnd.random() > c["participation"]:
            continue
        size = int(rnd.choice(c["sizes"]) * (1 + rnd.uniform(-c["size_jitter"], c["size_jitter"])))
        t0 = time.monotonic()
        try:
            if conn.w is None:
                await conn.open(c["connect_timeout_s"], c["settle_s"])
            await asyncio.wait_for(conn.request(size), c["timeout_s"])
            rec("campaign", src, t0, True, "", size, conn.n)
        except Exception as e:
            rec("campaign", src, t0, False, type(e).__name__, size, conn.n)
            conn.close()
    conn.close()

def honest_size(rnd, h):
    return int(min(h["max_size"], max(h["min_size"], rnd.lognormvariate(math.log(h["median_size"]), h["sigma"]))))

async def honest_source(i, src, ctx):
    h = cfg["honest"]
    rnd = random.Random(h["seed"] * 104729 + i)
    conn = Conn(src, ctx)
    left = 0
    await sleep_until(T0 + rnd.uniform(0, 2.0))
    while time.monotonic() < END:
        size = honest_size(rnd, h)
        t0 = time.monotonic()
        try:
            if conn.w is None:
                await conn.open(h["connect_timeout_s"], h["settle_s"])
                left = rnd.randint(3, 9)
            await asyncio.wait_for(conn.request(size), h["timeout_s"])
            rec("honest", src, t0, True, "", size, conn.n)
            left -= 1
            if left <= 0:
                conn.close()
        except Exception as e:
            rec("honest", src, t0, False, type(e).__name__, size, conn.n)
            conn.close()
        # Its own rhythm: exponential think times, now and then a pause.
        gap = rnd.expovariate(1.0 / h["mean_gap_s"])
        if rnd.random() < 0.1:
            gap += rnd.uniform(2.0, 5.0)
        await sleep_until(time.monotonic() + min(max(gap, 0.15), 8.0))

async def curl_source(i, src):
    h = cfg["honest"]
    rnd = random.Random(h["seed"] * 15485863 + i)
    await sleep_until(T0 + rnd.uniform(0, 2.0))
    n = 0
    while time.monotonic() < END:
        size = honest_size(rnd, h)
        t0 = time.monotonic()
        n += 1
        try:
            p = await asyncio.create_subprocess_exec(
                "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", str(h["timeout_s"]),
                "--cacert", cfg["cafile"], "--resolve", "%s:%d:%s" % (SNI, PORT, IP), "--interface", src,
                "-H", "Content-Type: application/json", "--data-binary", "@-",
                "https://%s:%d/v1/chat/completions" % (SNI, PORT),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            o, e = await asyncio.wait_for(p.communicate(b"c" * size), h["timeout_s"] + 2)
            ok = p.returncode == 0 and o.strip() == b"200"
            rec("honest", src, t0, ok, "" if ok else ("curl %s %s" % (p.returncode, e.decode(errors="replace").strip()))[:120], size, n)
        except Exception as e:
            rec("honest", src, t0, False, type(e).__name__, size, n)
        gap = rnd.expovariate(1.0 / h["mean_gap_s"])
        await sleep_until(time.monotonic() + min(max(gap, 0.3), 8.0))

async def main():
    cctx, hctx = campaign_ctx(), honest_ctx()
    tasks = [campaign_source(i, s, cctx) for i, s in enumerate(cfg["campaign"]["sources"])]
    tasks += [honest_source(i, s, hctx) for i, s in enumerate(cfg["honest"]["sources"])]
    tasks += [curl_source(i, s) for i, s in enumerate(cfg["honest"]["curl_sources"])]
    tasks.append(watch_stop())
    await asyncio.gather(*tasks)

asyncio.run(main())
out.close()
print("done", round(time.monotonic() - T0, 3), flush=True)
"#;

/// The campaign: lockstep rounds from many sources, one client, templated sizes.
#[derive(Clone, Debug)]
pub struct Campaign {
    pub sources: Vec<Ipv4Addr>,
    /// Connections are opened during the first `start` (staggered); rounds begin then.
    pub start: Duration,
    /// One request per source per round (each source: 1 / round requests/s).
    pub round: Duration,
    /// Each source fires within this long after the round's start.
    pub jitter: Duration,
    /// The share of sources firing in a round.
    pub participation: f64,
    /// The templated body sizes (bytes), each with ±`size_jitter` relative jitter.
    pub sizes: Vec<u32>,
    pub size_jitter: f64,
}

/// The honest clients: their own rhythm and sizes.
#[derive(Clone, Debug)]
pub struct Honest {
    /// Python clients with another TLS configuration (keep-alive, reconnecting every few requests).
    pub sources: Vec<Ipv4Addr>,
    /// curl, one process (connection) per request.
    pub curl_sources: Vec<Ipv4Addr>,
    /// Mean think time (exponential).
    pub mean_gap: Duration,
    /// Body sizes: lognormal with this median and sigma.
    pub median_size: u32,
    pub sigma: f64,
}

/// A run of the driver.
#[derive(Clone, Debug)]
pub struct Drive {
    pub campaign: Campaign,
    pub honest: Honest,
    /// The longest the driver runs; [`Drive::stop`] ends it earlier.
    pub duration: Duration,
    /// Seeds the clients' randomness; also names the run's files in the lab.
    pub seed: u64,
}

/// One request the driver made.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// `campaign` or `honest`.
    pub role: String,
    pub src: IpAddr,
    /// Seconds since the driver started.
    pub t: f64,
    pub ok: bool,
    pub err: String,
    pub size: u32,
}

impl Drive {
    fn stop_file(&self, lab: &Lab) -> PathBuf {
        lab.file(&format!("driver/stop-{}", self.seed))
    }

    /// Asks a running driver to stop: every client stops within about a quarter of a second, after its request
    /// in flight (bounded by its timeout).
    pub fn stop(&self, lab: &Lab) -> anyhow::Result<()> {
        fs::write(self.stop_file(lab), b"stop\n").context("writing the driver's stop file")
    }

    /// Runs the driver in the lab's client namespace against `server` until it ends by itself (killed if it
    /// overruns by 20 s). Returns every request's outcome.
    pub fn run(&self, lab: &Lab, server: &ApiServer) -> anyhow::Result<Vec<Outcome>> {
        let dir = lab.file("driver");
        fs::create_dir_all(&dir)?;
        let _ = fs::remove_file(self.stop_file(lab));
        let script = dir.join("driver.py");
        fs::write(&script, DRIVER_PY)?;
        let out = dir.join(format!("outcomes-{}.jsonl", self.seed));
        let secs = |d: Duration| d.as_secs_f64();
        let addrs = |v: &[Ipv4Addr]| v.iter().map(|a| a.to_string()).collect::<Vec<_>>();
        let config = json!({
            "sni": SERVER_NAME,
            "server_ip": server.addr.ip().to_string(),
            "port": server.addr.port(),
            "cafile": server.cert,
            "duration_s": secs(self.duration),
            "out": out,
            "stop_file": self.stop_file(lab),
            "campaign": {
                "seed": self.seed,
                "sources": addrs(&self.campaign.sources),
                "start_s": secs(self.campaign.start),
                "round_s": secs(self.campaign.round),
                "jitter_s": secs(self.campaign.jitter),
                "participation": self.campaign.participation,
                "sizes": self.campaign.sizes,
                "size_jitter": self.campaign.size_jitter,
                "settle_s": 0.3,
                "connect_timeout_s": 2.5,
                "timeout_s": 3.0,
            },
            "honest": {
                "seed": self.seed,
                "sources": addrs(&self.honest.sources),
                "curl_sources": addrs(&self.honest.curl_sources),
                "mean_gap_s": secs(self.honest.mean_gap),
                "median_size": self.honest.median_size,
                "sigma": self.honest.sigma,
                "min_size": 40,
                "max_size": 24000,
                "settle_s": 0.3,
                "connect_timeout_s": 4.0,
                "timeout_s": 4.0,
            },
        });
        let config_path = dir.join(format!("config-{}.json", self.seed));
        fs::write(&config_path, serde_json::to_vec_pretty(&config)?)?;
        let mut cmd = lab.client.command(python_bin());
        cmd.arg("-u").arg(&script).arg(&config_path);
        let run = run_bounded(cmd, self.duration + Duration::from_secs(20))?;
        if !run.success() {
            bail!("the driver failed: {run}");
        }
        let text = fs::read_to_string(&out).with_context(|| format!("reading {}", out.display()))?;
        text.lines()
            .map(|line| {
                let v: Value = serde_json::from_str(line).with_context(|| format!("outcome {line:?}"))?;
                Ok(Outcome {
                    role: v["role"].as_str().unwrap_or_default().to_string(),
                    src: v["src"]
                        .as_str()
                        .and_then(|s| s.parse().ok())
                        .ok_or_else(|| anyhow!("no src in {line}"))?,
                    t: v["t"].as_f64().unwrap_or(0.0),
                    ok: v["ok"].as_bool().unwrap_or(false),
                    err: v["err"].as_str().unwrap_or_default().to_string(),
                    size: v["size"].as_u64().unwrap_or(0) as u32,
                })
            })
            .collect()
    }
}

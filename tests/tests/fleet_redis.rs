//! The fleet core (`detector_user::fleet`) against a real `redis-server` (Debian's 7.0, installed by
//! `cargo xtask bootstrap`): three engines in one process publish and follow the decision log.
//!
//! Each test starts its own `redis-server` on a free loopback port with `--save "" --appendonly no` in a temp
//! directory, and kills it on drop. Every wait is bounded. The daemon is not wired to the engine yet, so these
//! tests check the fleet's views (what each host would enforce), not traffic.
//!
//! Propagation measurement (not a timed assertion):
//! `cargo test -p aqd-tests --test fleet_redis -- --ignored --nocapture propagation`

use std::{
    collections::HashMap,
    net::{Ipv4Addr, TcpListener},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use aqd_tests::skip_or_fail;
use detector_common::Action;
use detector_user::fleet::{
    engine::{Engine, EngineConfig, FleetEvent, Follower, Published, ResyncReason},
    merge::{Effective, KeyState},
    wire::{Entry, FleetKey, FleetOrigin, HostName, Op},
};

/// A `redis-server` of this test: loopback, no persistence, killed on drop.
struct RedisServer {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl RedisServer {
    fn start() -> Option<Self> {
        if Command::new("redis-server").arg("--version").output().is_err() {
            skip_or_fail("redis-server is not installed (cargo xtask bootstrap installs it)");
            return None;
        }
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let dir = std::env::temp_dir().join(format!("aqd-fleet-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut s = Self {
            port,
            dir,
            child: None,
        };
        s.spawn();
        Some(s)
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.cli(&["PING"]).trim() == "PONG" {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "redis-server on port {} did not answer PING within 5 s",
            self.port
        );
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Killed and started again on the same port, empty (no persistence).
    fn restart_empty(&mut self) {
        self.kill();
        self.spawn();
    }

    fn cli(&self, args: &[&str]) -> String {
        Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One simulated host: an engine and a follower task copying the changed keys of its view out.
struct Host {
    engine: Engine,
    view: Arc<Mutex<HashMap<FleetKey, KeyState>>>,
    arrivals: Arc<Mutex<HashMap<FleetKey, Instant>>>,
    resyncs: Arc<Mutex<Vec<ResyncReason>>>,
    paused: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Host {
    async fn start(url: &str, name: &str) -> Self {
        let mut cfg = EngineConfig::new(url, HostName::new(name).unwrap());
        cfg.read_block = Duration::from_millis(200);
        cfg.republish_jitter = Duration::from_millis(200);
        cfg.backoff_max = Duration::from_millis(500);
        let engine = Engine::connect(cfg).await.expect("engine connects");
        let view = Arc::new(Mutex::new(HashMap::new()));
        let arrivals = Arc::new(Mutex::new(HashMap::new()));
        let resyncs = Arc::new(Mutex::new(Vec::new()));
        let paused = Arc::new(AtomicBool::new(false));
        let mut f = Follower::new(engine.clone());
        let (v, a, r, p) = (view.clone(), arrivals.clone(), resyncs.clone(), paused.clone());
        let task = tokio::spawn(async move {
            loop {
                if p.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
                match f.next().await {
                    FleetEvent::Records(recs) => {
                        let now = Instant::now();
                        let mut v = v.lock().unwrap();
                        let mut a = a.lock().unwrap();
                        for rec in recs {
                            if let Some(st) = f.view().get(&rec.record.key) {
                                v.insert(rec.record.key, st.clone());
                            }
                            a.entry(rec.record.key).or_insert(now);
                        }
                    }
                    FleetEvent::Resynced { reason, .. } => {
                        *v.lock().unwrap() = f.view().clone();
                        r.lock().unwrap().push(reason);
                    }
                    FleetEvent::Disconnected { .. } | FleetEvent::Idle => {}
                }
            }
        });
        Self {
            engine,
            view,
            arrivals,
            resyncs,
            paused,
            task,
        }
    }

    fn effective(&self, key: &FleetKey, now_ms: u64) -> Effective {
        self.view
            .lock()
            .unwrap()
            .get(key)
            .map_or(Effective::Nothing, |s| s.effective(now_ms))
    }

    fn resynced(&self, reason: ResyncReason) -> bool {
        self.resyncs.lock().unwrap().contains(&reason)
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn hosts(url: &str, n: usize) -> Vec<Host> {
    let mut out = Vec::new();
    for i in 1..=n {
        out.push(Host::start(url, &format!("h{i}")).await);
    }
    wait_for("every follower's first snapshot", Duration::from_secs(5), || {
        out.iter().all(|h| h.resynced(ResyncReason::Start))
    })
    .await;
    out
}

async fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    start.elapsed()
}

fn ip(s: &str) -> FleetKey {
    FleetKey::addr(s.parse().unwrap())
}

fn block(exp: Option<u64>) -> Op {
    Op::Put(Entry::new(Action::Block, None, exp).unwrap())
}

fn is_block(e: &Effective, exp: Option<u64>) -> bool {
    matches!(e, Effective::Act { entry, .. } if entry.action == Action::Block && entry.expires_ms == exp)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_unblock_replay_and_an_emptied_redis() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let hs = hosts(&redis.url(), 3).await;
    let now = hs[0].engine.fleet_now_ms();
    let k1 = ip("203.0.113.7");
    let exp = Some(now + 60_000);

    // A put on h1 arrives on h2 and h3 within 1 s with the same absolute expiry.
    let put = hs[0].engine.record(k1, FleetOrigin::Model, block(exp));
    assert!(matches!(
        hs[0].engine.publish(put.clone()).await.unwrap(),
        Published::Applied { .. }
    ));
    let took = wait_for("the block on every host", Duration::from_secs(1), || {
        hs.iter().all(|h| is_block(&h.effective(&k1, now), exp))
    })
    .await;
    eprintln!("put propagated to all hosts in {took:?}");

    // An operator unblock on h2 removes it everywhere and holds the key against the model.
    let hold_until = now + 120_000;
    let hold = Some(hold_until);
    let unblock = hs[1]
        .engine
        .record(k1, FleetOrigin::Operator, Op::Del { hold_until_ms: hold });
    assert!(matches!(
        hs[1].engine.publish(unblock).await.unwrap(),
        Published::Applied { .. }
    ));
    wait_for("the unblock on every host", Duration::from_secs(1), || {
        hs.iter()
            .all(|h| h.effective(&k1, now) == Effective::Held { until_ms: hold_until })
    })
    .await;

    // A replay of the older put (a stale outbox) is rejected by Redis, and by the merge on every host.
    match hs[0].engine.publish(put.clone()).await.unwrap() {
        Published::Rejected { reason } => assert!(reason.contains("unblock"), "{reason}"),
        other => panic!("stale replay was not rejected: {other:?}"),
    }
    let mut older = put.clone();
    older.host = HostName::new("h3").unwrap();
    assert!(matches!(
        hs[2].engine.publish(older).await.unwrap(),
        Published::Rejected { .. }
    ));
    // A new model block during the hold is stored but held off.
    let reblock = hs[2].engine.record(k1, FleetOrigin::Model, block(None));
    assert!(matches!(
        hs[2].engine.publish(reblock).await.unwrap(),
        Published::Applied { .. }
    ));

    // h3's operator block of another key, then Redis is killed and restarted empty.
    let k2 = ip("198.51.100.20");
    let op_block = hs[2].engine.record(k2, FleetOrigin::Operator, block(None));
    hs[2].engine.publish(op_block).await.unwrap();
    wait_for("k2 on every host", Duration::from_secs(1), || {
        hs.iter().all(|h| is_block(&h.effective(&k2, now), None))
    })
    .await;
    let epoch_before = hs[0].engine.status().epoch.clone();
    redis.kill();
    // While Redis is down: enforcement state is kept, local decisions queue.
    let k3 = ip("192.0.2.33");
    let offline = hs[0].engine.record(k3, FleetOrigin::Model, block(exp));
    let mut queued = false;
    for _ in 0..50 {
        // The first publish after the kill may still see the old socket; it must end up queued either way.
        if hs[0].engine.publish(offline.clone()).await.unwrap() == Published::Queued {
            queued = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(queued, "a publish with Redis down is queued");
    assert!(hs[0].engine.status().outbox_len >= 1);
    assert!(
        hs.iter().all(|h| is_block(&h.effective(&k2, now), None)),
        "views are kept"
    );

    redis.restart_empty();
    let took = wait_for(
        "every host notices the new epoch and converges",
        Duration::from_secs(10),
        || {
            hs.iter().all(|h| {
                h.resynced(ResyncReason::EpochChanged)
                    && is_block(&h.effective(&k2, now), None)
                    && is_block(&h.effective(&k3, now), exp)
                    && h.effective(&k1, now) == Effective::Held { until_ms: hold_until }
            })
        },
    )
    .await;
    eprintln!("converged after the empty restart in {took:?}");
    assert_ne!(hs[0].engine.status().epoch, epoch_before);
    assert_eq!(hs[0].engine.status().outbox_len, 0);
    // After the hold, the model's newer block applies again (the unblock came back with its hold, not lost).
    let after = hold_until;
    assert!(hs.iter().all(|h| is_block(&h.effective(&k1, after), None)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_trimmed_away_takes_the_snapshot_path() {
    let Some(redis) = RedisServer::start() else { return };
    let hs = hosts(&redis.url(), 3).await;
    let now = hs[0].engine.fleet_now_ms();
    let exp = Some(now + 60_000);
    // h3 stops reading; h1 writes, the log is trimmed to nothing, h1 writes once more.
    hs[2].paused.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let keys: Vec<FleetKey> = (0..50).map(|i| ip(&format!("10.9.0.{i}"))).collect();
    let recs = keys
        .iter()
        .map(|k| hs[0].engine.record(*k, FleetOrigin::Fingerprint, block(exp)))
        .collect();
    hs[0].engine.publish_batch(recs).await.unwrap();
    wait_for("h2 has read the 50 records", Duration::from_secs(2), || {
        keys.iter().all(|k| is_block(&hs[1].effective(k, now), exp))
    })
    .await;
    assert_eq!(redis.cli(&["XTRIM", "dec:log", "MAXLEN", "0"]).trim(), "50");
    let last = ip("10.9.1.1");
    let r = hs[0].engine.record(last, FleetOrigin::Fingerprint, block(exp));
    hs[0].engine.publish(r).await.unwrap();
    hs[2].paused.store(false, Ordering::Relaxed);
    wait_for("h3 resynchronises by snapshot", Duration::from_secs(5), || {
        hs[2].resynced(ResyncReason::Trimmed)
            && keys
                .iter()
                .chain([&last])
                .all(|k| is_block(&hs[2].effective(k, now), exp))
    })
    .await;
    // h2 kept up: it never needed a snapshot.
    assert!(!hs[1].resynced(ResyncReason::Trimmed));
    assert!(keys.iter().all(|k| is_block(&hs[1].effective(k, now), exp)));
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement: run with --ignored --nocapture"]
async fn propagation_of_10000_records() {
    let Some(redis) = RedisServer::start() else { return };
    let hs = hosts(&redis.url(), 3).await;
    let now = hs[0].engine.fleet_now_ms();
    const N: u32 = 10_000;
    const BATCH: usize = 100;
    let keys: Vec<FleetKey> = (0..N)
        .map(|i| FleetKey::addr(std::net::IpAddr::V4(Ipv4Addr::from(0x0a40_0000 + i))))
        .collect();
    let mut sent: HashMap<FleetKey, Instant> = HashMap::new();
    let start = Instant::now();
    for chunk in keys.chunks(BATCH) {
        let recs = chunk
            .iter()
            .map(|k| {
                hs[0]
                    .engine
                    .record(*k, FleetOrigin::Model, block(Some(now + 600_000)))
            })
            .collect();
        let t = Instant::now();
        let res = hs[0].engine.publish_batch(recs).await.unwrap();
        assert!(res.iter().all(|r| matches!(r, Published::Applied { .. })));
        for k in chunk {
            sent.insert(*k, t);
        }
    }
    let published = start.elapsed();
    wait_for("all records on h2 and h3", Duration::from_secs(60), || {
        hs[1..]
            .iter()
            .all(|h| h.arrivals.lock().unwrap().len() == N as usize)
    })
    .await;
    let applied = start.elapsed();
    let mut delays = Vec::new();
    for h in &hs[1..] {
        for (k, at) in h.arrivals.lock().unwrap().iter() {
            delays.push(at.duration_since(sent[k]));
        }
    }
    delays.sort();
    let info = redis.cli(&["INFO", "memory"]);
    let used = info
        .lines()
        .find(|l| l.starts_with("used_memory_human:"))
        .unwrap_or("used_memory_human:?")
        .trim()
        .to_owned();
    eprintln!(
        "fleet propagation, {N} records, batches of {BATCH}, 1 publisher -> 2 followers: p50 {:?}, p99 {:?}, \
         max {:?}; published {:.0} records/s, applied on both followers {:.0} records/s; redis {used}",
        percentile(&delays, 0.50),
        percentile(&delays, 0.99),
        delays.last().unwrap(),
        f64::from(N) / published.as_secs_f64(),
        f64::from(N) / applied.as_secs_f64(),
    );
}

//! Serving connections so that no client can take a server down: used by the control socket and the metrics
//! endpoint.
//!
//! - [`accept_loop`] never ends: a failed `accept()` (EMFILE with a service's soft open-files limit, ENFILE,
//!   ENOMEM, ECONNABORTED, …) is counted, logged at most once per [`ERROR_LOG_INTERVAL`], and retried — at once
//!   for errors about the one connection, after a growing pause ([`Backoff`]) for resource exhaustion, which also
//!   sheds the oldest idle connection to give a descriptor back.
//! - [`Limiter`] caps concurrent connections. At the cap, the oldest connection still waiting for its request is
//!   closed to make room (a client that connects and sends nothing cannot hold a slot against one that asks);
//!   if every slot is busy with a request, the new connection is accepted and closed at once. Both are counted.
//! - [`within`] puts a deadline on a read or a write, so a client that never finishes its line or never reads
//!   its answer is dropped.
//! - [`lock`] takes a mutex whether or not a panicking thread poisoned it (the panic was answered as an error;
//!   the state it guarded is what the handler left, as it would be after an error return).
//! - [`raise_nofile_limit`] lifts the soft open-files limit to the hard one at start.

use std::{
    collections::BTreeMap,
    future::Future,
    io,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use tokio::sync::Notify;

/// Accept errors are logged at most this often per server (the rest are counted and summarised).
pub const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The connection caps and figures of the daemon's two servers (status and metrics read them).
#[derive(Debug)]
pub struct Servers {
    pub control: (Arc<Limiter>, Arc<ServeStats>),
    pub metrics: (Arc<Limiter>, Arc<ServeStats>),
}

impl Servers {
    pub fn new(control_cap: usize, metrics_cap: usize) -> Self {
        Self {
            control: (Limiter::new(control_cap), Arc::default()),
            metrics: (Limiter::new(metrics_cap), Arc::default()),
        }
    }
}

/// A listening socket the accept loop can take connections from.
pub trait Listener: Send + 'static {
    type Stream: Send + 'static;
    fn poll_accept_stream(&self, cx: &mut Context<'_>) -> Poll<io::Result<Self::Stream>>;
}

impl Listener for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    fn poll_accept_stream(&self, cx: &mut Context<'_>) -> Poll<io::Result<Self::Stream>> {
        self.poll_accept(cx).map_ok(|(stream, _)| stream)
    }
}

impl Listener for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    fn poll_accept_stream(&self, cx: &mut Context<'_>) -> Poll<io::Result<Self::Stream>> {
        self.poll_accept(cx).map_ok(|(stream, _)| stream)
    }
}

/// What a server did with its connections (for metrics and status).
#[derive(Debug, Default)]
pub struct ServeStats {
    /// Connections accepted (including those closed at once over the cap).
    pub accepted: AtomicU64,
    /// Closed at once: at the cap with every slot busy.
    pub rejected: AtomicU64,
    /// Closed to make room: the oldest connection still waiting for its request, at the cap.
    pub evicted: AtomicU64,
    /// `accept()` failures (each retried).
    pub accept_errors: AtomicU64,
    /// Connections dropped because a read or write missed its deadline.
    pub timed_out: AtomicU64,
    /// Handlers that panicked (answered with an error).
    pub panicked: AtomicU64,
}

impl ServeStats {
    fn bump(counter: &AtomicU64) -> u64 {
        counter.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// A cap on concurrent connections, with eviction of the oldest idle one at the cap.
#[derive(Debug)]
pub struct Limiter {
    cap: usize,
    slots: Mutex<Slots>,
}

#[derive(Debug, Default)]
struct Slots {
    next_id: u64,
    /// Open connections by age (ids increase): whether each still waits for its request, and its eviction signal.
    open: BTreeMap<u64, (bool, Arc<Notify>)>,
}

/// One admitted connection's place under the cap; freed on drop.
#[derive(Debug)]
pub struct Slot {
    id: u64,
    limiter: Arc<Limiter>,
    evict: Arc<Notify>,
}

/// What [`Limiter::admit`] decided.
#[derive(Debug)]
pub enum Admission {
    /// A free slot.
    Admitted(Slot),
    /// A slot freed by closing the oldest idle connection.
    Evicted(Slot),
    /// Every slot busy with a request: close the new connection.
    Rejected,
}

impl Limiter {
    /// A limiter for at most `cap` (at least one) connections.
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(Self {
            cap: cap.max(1),
            slots: Mutex::new(Slots::default()),
        })
    }

    pub fn cap(&self) -> usize {
        self.cap
    }

    /// Connections holding a slot now.
    pub fn active(&self) -> usize {
        lock(&self.slots).open.len()
    }

    /// A slot for a new connection (which starts out waiting for its request).
    pub fn admit(self: &Arc<Self>) -> Admission {
        let mut slots = lock(&self.slots);
        let evicted = if slots.open.len() >= self.cap {
            if !Self::evict_oldest_idle(&mut slots) {
                return Admission::Rejected;
            }
            true
        } else {
            false
        };
        let id = slots.next_id;
        slots.next_id += 1;
        let evict = Arc::new(Notify::new());
        slots.open.insert(id, (true, Arc::clone(&evict)));
        let slot = Slot {
            id,
            limiter: Arc::clone(self),
            evict,
        };
        if evicted {
            Admission::Evicted(slot)
        } else {
            Admission::Admitted(slot)
        }
    }

    /// Closes the oldest connection still waiting for its request; false if there is none.
    pub fn shed_idle(&self) -> bool {
        Self::evict_oldest_idle(&mut lock(&self.slots))
    }

    fn evict_oldest_idle(slots: &mut Slots) -> bool {
        let Some(id) = slots
            .open
            .iter()
            .find_map(|(id, (waiting, _))| waiting.then_some(*id))
        else {
            return false;
        };
        if let Some((_, evict)) = slots.open.remove(&id) {
            // `notify_one` stores a permit: the connection sees it even if it is not waiting yet.
            evict.notify_one();
        }
        true
    }
}

impl Slot {
    /// Resolves when the limiter closed this connection to make room for a newer one.
    pub async fn evicted(&self) {
        self.evict.notified().await
    }

    /// The request has arrived: from now on the connection is never evicted.
    pub fn busy(&self) {
        if let Some((waiting, _)) = lock(&self.limiter.slots).open.get_mut(&self.id) {
            *waiting = false;
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        // Already gone if it was evicted.
        lock(&self.limiter.slots).open.remove(&self.id);
    }
}

/// The pause before retrying a failed `accept()`: 5 ms doubling to 1 s, reset by the next success.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Backoff {
    pub const FIRST: Duration = Duration::from_millis(5);
    pub const MAX: Duration = Duration::from_secs(1);

    pub fn new() -> Self {
        Self { next: Self::FIRST }
    }

    /// The pause to take now; the one after is twice as long, up to [`Self::MAX`].
    pub fn pause(&mut self) -> Duration {
        let pause = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        pause
    }

    pub fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

/// Whether an accept error is about the system's resources (back off) rather than about the one connection
/// that failed (retry at once).
pub fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Accepts connections on `listener` for as long as the task runs, admitting each under `limiter` and handing
/// it to `serve` (spawned). Never returns: see the module doc for what happens to errors and to connections over
/// the cap.
pub async fn accept_loop<L, F, Fut>(
    server: &'static str,
    listener: L,
    limiter: Arc<Limiter>,
    stats: Arc<ServeStats>,
    mut serve: F,
) where
    L: Listener,
    F: FnMut(L::Stream, Slot) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut backoff = Backoff::new();
    let mut last_logged: Option<Instant> = None;
    let mut errors_since_log = 0u64;
    let mut last_reject_log: Option<Instant> = None;
    loop {
        match std::future::poll_fn(|cx| listener.poll_accept_stream(cx)).await {
            Ok(stream) => {
                backoff.reset();
                ServeStats::bump(&stats.accepted);
                match limiter.admit() {
                    Admission::Admitted(slot) => {
                        tokio::spawn(serve(stream, slot));
                    }
                    Admission::Evicted(slot) => {
                        ServeStats::bump(&stats.evicted);
                        tokio::spawn(serve(stream, slot));
                    }
                    Admission::Rejected => {
                        let n = ServeStats::bump(&stats.rejected);
                        drop(stream);
                        if last_reject_log.is_none_or(|t| t.elapsed() >= ERROR_LOG_INTERVAL) {
                            last_reject_log = Some(Instant::now());
                            tracing::warn!(
                                server,
                                cap = limiter.cap(),
                                rejected_total = n,
                                "connection closed at once: every slot is busy with a request"
                            );
                        }
                    }
                }
            }
            Err(e) => {
                ServeStats::bump(&stats.accept_errors);
                errors_since_log += 1;
                let exhausted = is_resource_exhaustion(&e);
                let pause = if exhausted {
                    // Give a descriptor back: an idle connection is the cheapest thing to lose.
                    limiter.shed_idle();
                    backoff.pause()
                } else {
                    Duration::ZERO
                };
                if last_logged.is_none_or(|t| t.elapsed() >= ERROR_LOG_INTERVAL) {
                    last_logged = Some(Instant::now());
                    tracing::warn!(
                        server,
                        error = %e,
                        errors = errors_since_log,
                        retry_in_ms = pause.as_millis() as u64,
                        "accept failed; retrying (the server keeps running)"
                    );
                    errors_since_log = 0;
                }
                if !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }
}

/// Runs `io` with a deadline; a miss is a `TimedOut` error naming `what` and the deadline.
pub async fn within<T>(
    what: &'static str,
    deadline: Duration,
    io: impl Future<Output = io::Result<T>>,
) -> io::Result<T> {
    match tokio::time::timeout(deadline, io).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("{what}: no progress within {deadline:?}"),
        )),
    }
}

/// Locks `mutex` even if a panicking thread poisoned it, and clears the poison so later lockers see a
/// plain mutex.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| {
        tracing::warn!("a panic happened while this lock was held; going on with the state it left");
        mutex.clear_poison();
        poisoned.into_inner()
    })
}

/// The open-files limits before and after [`raise_nofile_limit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NofileLimits {
    pub soft_before: u64,
    pub soft: u64,
    pub hard: u64,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (systemd gives services a soft 1,024 by default).
pub fn raise_nofile_limit() -> io::Result<NofileLimits> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let soft_before = limit.rlim_cur;
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(NofileLimits {
        soft_before,
        soft: limit.rlim_cur,
        hard: limit.rlim_max,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_bound_and_resets() {
        let mut b = Backoff::new();
        let pauses: Vec<Duration> = (0..10).map(|_| b.pause()).collect();
        assert_eq!(pauses[0], Backoff::FIRST);
        assert_eq!(pauses[1], Backoff::FIRST * 2);
        assert!(pauses.windows(2).all(|w| w[1] >= w[0]));
        assert_eq!(*pauses.last().unwrap(), Backoff::MAX);
        b.reset();
        assert_eq!(b.pause(), Backoff::FIRST);
    }

    #[test]
    fn resource_errors_back_off_and_connection_errors_do_not() {
        for errno in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            assert!(is_resource_exhaustion(&io::Error::from_raw_os_error(errno)));
        }
        for errno in [libc::ECONNABORTED, libc::EPROTO, libc::EINTR] {
            assert!(!is_resource_exhaustion(&io::Error::from_raw_os_error(errno)));
        }
    }

    /// At the cap the oldest idle connection makes room; busy ones are never evicted; with every slot busy a new
    /// connection is rejected; a dropped slot frees its place.
    #[tokio::test]
    async fn limiter_evicts_the_oldest_idle_then_rejects() {
        let limiter = Limiter::new(2);
        let Admission::Admitted(a) = limiter.admit() else {
            panic!("first admitted")
        };
        let Admission::Admitted(b) = limiter.admit() else {
            panic!("second admitted")
        };
        assert_eq!(limiter.active(), 2);
        let Admission::Evicted(c) = limiter.admit() else {
            panic!("third admitted by evicting the oldest idle")
        };
        // `a` was the oldest idle one: its signal fired (a stored permit, so this returns at once).
        tokio::time::timeout(Duration::from_secs(5), a.evicted())
            .await
            .expect("a evicted");
        assert_eq!(limiter.active(), 2);
        b.busy();
        c.busy();
        assert!(matches!(limiter.admit(), Admission::Rejected));
        assert!(!limiter.shed_idle());
        drop(a); // evicted already: its drop must not free another slot
        assert_eq!(limiter.active(), 2);
        drop(b);
        assert_eq!(limiter.active(), 1);
        assert!(matches!(limiter.admit(), Admission::Admitted(_)));
    }

    #[test]
    fn a_poisoned_lock_is_recovered_and_cleared() {
        let m = Arc::new(Mutex::new(1));
        let m2 = Arc::clone(&m);
        let _ = std::thread::spawn(move || {
            let _g = m2.lock().unwrap();
            panic!("poisoning the lock on purpose");
        })
        .join();
        assert!(m.is_poisoned());
        *lock(&m) += 1;
        assert!(!m.is_poisoned());
        assert_eq!(*lock(&m), 2);
    }

    #[tokio::test]
    async fn a_missed_deadline_names_what_timed_out() {
        let e = within("reading the request", Duration::from_millis(10), async {
            std::future::pending::<io::Result<()>>().await
        })
        .await
        .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(e.to_string().contains("reading the request"), "{e}");
    }
}

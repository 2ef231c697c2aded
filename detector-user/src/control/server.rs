//! The control socket's server: binds the socket (root-only 0600, or 0660 with a configured group), accepts
//! with the shared accept loop (`serve`: backoff on accept errors, a connection cap, idle clients evicted at the
//! cap), reads one request within [`READ_TIMEOUT`], answers within [`WRITE_TIMEOUT`]. Malformed, oversized,
//! unknown or wrong-version requests get an error reply, and a panicking handler is answered with an error too;
//! a client can never take the daemon down.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::Path,
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _},
    net::UnixListener,
};

use super::{
    proto::{ControlError, ErrorKind, MAX_REQUEST_BYTES, Request, decode_request, encode_response},
    views::Response,
};
use crate::serve::{self, Limiter, ServeStats, Slot};

/// A client that sends nothing for this long is dropped.
const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// A client that does not take its reply (or the close) for this long is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Answers one request; implemented by the daemon (see `control::handler` for the shared mapping).
pub trait Handler: Send + 'static {
    fn handle(&mut self, request: Request) -> Result<Response, ControlError>;
}

/// Serves connections on a bound socket until the task is dropped; never ends on its own (accept errors are
/// retried, connections over the cap closed: see `serve`).
pub async fn serve_listener<H: Handler>(
    listener: UnixListener,
    handler: Arc<Mutex<H>>,
    limiter: Arc<Limiter>,
    stats: Arc<ServeStats>,
) {
    let per_connection = Arc::clone(&stats);
    serve::accept_loop("control", listener, limiter, stats, move |stream, slot| {
        let handler = Arc::clone(&handler);
        let stats = Arc::clone(&per_connection);
        async move {
            if let Err(e) = serve_one(stream, handler, &slot, &stats).await {
                if e.kind() == std::io::ErrorKind::TimedOut {
                    stats.timed_out.fetch_add(1, Ordering::Relaxed);
                }
                tracing::debug!(error = %e, "control connection ended with an error");
            }
        }
    })
    .await
}

/// Binds the control socket (replacing a stale one) with root-only (or group) permissions.
pub fn bind(path: &Path, group: Option<&str>) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(path)?;
    let mode = match group {
        Some(group) => {
            let gid = group_id(group).ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("socket_group '{group}' does not exist"),
                )
            })?;
            std::os::unix::fs::chown(path, None, Some(gid))?;
            0o660
        }
        None => 0o600,
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(listener)
}

fn group_id(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: getgrnam returns a pointer to static storage or null; we only read gr_gid at once.
    let entry = unsafe { libc::getgrnam(c.as_ptr()) };
    (!entry.is_null()).then(|| unsafe { (*entry).gr_gid })
}

async fn serve_one<H: Handler>(
    stream: tokio::net::UnixStream,
    handler: Arc<Mutex<H>>,
    slot: &Slot,
    stats: &ServeStats,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = tokio::io::BufReader::new(read.take(MAX_REQUEST_BYTES as u64 + 1));
    let mut line = Vec::new();
    let read = tokio::select! {
        read = tokio::time::timeout(READ_TIMEOUT, reader.read_until(b'\n', &mut line)) => read,
        // At the connection cap, a client that has not sent its request yet makes room for a newer one.
        () = slot.evicted() => return Ok(()),
    };
    slot.busy();
    let response = match read {
        Err(_) => {
            stats.timed_out.fetch_add(1, Ordering::Relaxed);
            Err(ControlError::new(
                ErrorKind::BadRequest,
                "timed out waiting for the request",
            ))
        }
        Ok(Err(e)) => Err(ControlError::new(
            ErrorKind::BadRequest,
            format!("reading the request: {e}"),
        )),
        Ok(Ok(_)) if line.len() > MAX_REQUEST_BYTES => Err(ControlError::new(
            ErrorKind::BadRequest,
            format!("request larger than {MAX_REQUEST_BYTES} bytes"),
        )),
        Ok(Ok(_)) => match decode_request(&line) {
            Ok(request) => handle_guarded(handler, request, stats).await,
            Err(e) => Err(e),
        },
    };
    let encoded = encode_response(response);
    serve::within("writing the reply", WRITE_TIMEOUT, write.write_all(&encoded)).await?;
    // A large request or answer (an import, a long list) leaves its buffers in the allocator's free lists;
    // hand them back so the daemon's resident memory reflects what it keeps.
    if line.len() > 1 << 20 || encoded.len() > 1 << 20 {
        drop(encoded);
        // SAFETY: malloc_trim only releases free heap memory.
        unsafe { libc::malloc_trim(0) };
    }
    serve::within("closing the connection", WRITE_TIMEOUT, write.shutdown()).await
}

/// Runs the handler on a blocking thread (map writes are quick syscalls; the runtime's other tasks keep moving).
/// A panic is caught while the lock is held, so the lock is not poisoned, and answered as an error.
async fn handle_guarded<H: Handler>(
    handler: Arc<Mutex<H>>,
    request: Request,
    stats: &ServeStats,
) -> Result<Value, ControlError> {
    let outcome = tokio::task::spawn_blocking(move || {
        let mut handler = serve::lock(&handler);
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler.handle(request)))
    })
    .await;
    match outcome {
        Ok(Ok(Ok(response))) => serde_json::to_value(response).map_err(ControlError::failed),
        Ok(Ok(Err(e))) => Err(e),
        Ok(Err(panic)) => {
            stats.panicked.fetch_add(1, Ordering::Relaxed);
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(no message)".into());
            tracing::error!(panic = %what, "a control request handler panicked; answered with an error");
            Err(ControlError::new(
                ErrorKind::Failed,
                format!(
                    "the daemon failed handling this request (handler panicked: {what}); it keeps running"
                ),
            ))
        }
        Err(e) => Err(ControlError::new(
            ErrorKind::Failed,
            format!("the request's worker ended: {e}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use super::*;
    use crate::control::{ClientError, ImportInto, call, views::ImportView};

    /// A request whose answer the test handler gives (an import view).
    const IMPORT_NOTHING: Request = Request::Import {
        into: ImportInto::Block,
        entries: Vec::new(),
        ttl_secs: None,
        reason: String::new(),
        force: false,
    };

    /// The socket is 0600 (root only) by default, and 0660 owned by the configured group otherwise; a group that
    /// does not exist is an error naming it.
    #[tokio::test]
    async fn socket_permissions_follow_the_configured_group() {
        use std::os::unix::fs::MetadataExt as _;
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: chown to a group needs root");
            return;
        }
        let dir = std::env::temp_dir().join(format!("aqd-socket-test-{}", std::process::id()));
        let path = dir.join("aqd.sock");
        let _listener = bind(&path, None).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        let gid = group_id("nogroup").expect("Debian has a nogroup group");
        let _listener = bind(&path, Some("nogroup")).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!((meta.mode() & 0o777, meta.gid()), (0o660, gid));
        let err = bind(&path, Some("no-such-group-aqd")).unwrap_err();
        assert!(err.to_string().contains("no-such-group-aqd"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A handler that panics on `status` and answers everything else with the number of requests it saw.
    struct PanicsOnStatus {
        seen: u64,
    }

    impl Handler for PanicsOnStatus {
        fn handle(&mut self, request: Request) -> Result<Response, ControlError> {
            self.seen += 1;
            if request == (Request::Status {}) {
                panic!("status handler broke on purpose");
            }
            Ok(Response::Imported(ImportView {
                imported: self.seen as usize,
                seconds: 0.0,
            }))
        }
    }

    /// A panicking handler answers that client with an error; the server, the handler's state and the lock
    /// go on, so the next request is served.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_handler_panic_answers_an_error_and_the_next_request_works() {
        let dir = std::env::temp_dir().join(format!("aqd-panic-test-{}", std::process::id()));
        let path = dir.join("aqd.sock");
        let listener = bind(&path, None).unwrap();
        let handler = Arc::new(Mutex::new(PanicsOnStatus { seen: 0 }));
        let stats = Arc::new(ServeStats::default());
        let server = tokio::spawn(serve_listener(
            listener,
            Arc::clone(&handler),
            Limiter::new(4),
            Arc::clone(&stats),
        ));
        let client_path = path.clone();
        let (first, second) = tokio::task::spawn_blocking(move || {
            (
                call(&client_path, &Request::Status {}),
                call(&client_path, &IMPORT_NOTHING),
            )
        })
        .await
        .unwrap();
        match first {
            Err(ClientError::Daemon(e)) => {
                assert_eq!(e.kind, ErrorKind::Failed);
                assert!(
                    e.message.contains("status handler broke on purpose"),
                    "{}",
                    e.message
                );
            }
            other => panic!("expected an error reply, got {other:?}"),
        }
        assert_eq!(second.unwrap().into_imported().unwrap().imported, 2);
        assert!(!handler.is_poisoned());
        assert_eq!(stats.panicked.load(Ordering::Relaxed), 1);
        assert!(!server.is_finished());
        server.abort();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A client that connects and never sends its request is closed to make room for a newer one at the cap,
    /// so the operator's request is answered while idle clients hold every slot.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_clients_at_the_cap_make_room_for_a_request() {
        let dir = std::env::temp_dir().join(format!("aqd-cap-test-{}", std::process::id()));
        let path = dir.join("aqd.sock");
        let listener = bind(&path, None).unwrap();
        let stats = Arc::new(ServeStats::default());
        let server = tokio::spawn(serve_listener(
            listener,
            Arc::new(Mutex::new(PanicsOnStatus { seen: 0 })),
            Limiter::new(3),
            Arc::clone(&stats),
        ));
        let client_path = path.clone();
        let answer = tokio::task::spawn_blocking(move || {
            let idle: Vec<UnixStream> = (0..10)
                .map(|_| UnixStream::connect(&client_path).unwrap())
                .collect();
            let answer = call(&client_path, &IMPORT_NOTHING);
            drop(idle);
            answer
        })
        .await
        .unwrap();
        assert_eq!(answer.unwrap().into_imported().unwrap().imported, 1);
        assert_eq!(stats.accepted.load(Ordering::Relaxed), 11);
        assert_eq!(stats.evicted.load(Ordering::Relaxed), 8);
        assert_eq!(stats.rejected.load(Ordering::Relaxed), 0);
        server.abort();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! The control socket: a versioned JSON-lines protocol over a Unix socket, its server and its client.
//!
//! One request per connection, one line each way:
//! ```text
//! → {"version":1,"cmd":"decide","target":"192.0.2.7","action":"block","ttl_secs":600,"reason":"scraper"}
//! ← {"version":1,"ok":true,"result":{...}}
//! ← {"version":1,"ok":false,"error":{"kind":"refused","message":"refusing to block ..."}}
//! ```
//! Malformed, oversized, unknown or wrong-version requests get an error reply, and a panicking handler is
//! answered with an error too; a client can never take the daemon down. Connections are capped
//! (`daemon.control_max_connections`), must send their request within 30 s and take the reply within 30 s; the
//! accept loop survives accept errors (see `serve`). The socket is root-only (0600), or 0660 with a configured
//! group.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::{fs::PermissionsExt as _, net::UnixStream},
    path::Path,
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _},
    net::UnixListener,
};

use crate::{
    maps::List,
    serve::{self, Limiter, ServeStats, Slot},
};

pub const PROTOCOL_VERSION: u32 = 1;
/// Largest request accepted (an import of ~500k entries fits).
pub const MAX_REQUEST_BYTES: usize = 16 << 20;
/// A client that sends nothing for this long is dropped.
const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// A client that does not take its reply (or the close) for this long is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// What the CLI asks the daemon.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    // Struct variants, even when empty: serde ignores unknown fields of unit variants.
    Status {},
    List {
        what: ListWhat,
    },
    /// block / throttle / monitor.
    Decide {
        target: String,
        action: String,
        #[serde(default)]
        class: Option<String>,
        #[serde(default)]
        ttl_secs: Option<u64>,
        #[serde(default)]
        permanent: bool,
        #[serde(default)]
        reason: String,
        #[serde(default)]
        force: bool,
    },
    /// unblock.
    Remove {
        target: String,
    },
    ListAdd {
        list: List,
        target: String,
        #[serde(default)]
        ttl_secs: Option<u64>,
        #[serde(default)]
        force: bool,
    },
    ListRemove {
        list: List,
        target: String,
    },
    /// Bulk: every entry into the allowlist, the denylist, or block decisions.
    Import {
        into: ImportInto,
        entries: Vec<String>,
        #[serde(default)]
        ttl_secs: Option<u64>,
        #[serde(default)]
        reason: String,
        #[serde(default)]
        force: bool,
    },
    Reload {},
    /// Fingerprints seen and verdicts by fingerprint.
    FpList {},
    /// The model's highest scores: `kind` is source, prefix or fingerprint.
    ScoreTop {
        kind: String,
        #[serde(default)]
        limit: Option<usize>,
    },
    /// Why an address, prefix or fingerprint has its score and tier: features, contributions, history.
    Explain {
        target: String,
    },
    /// A verdict by fingerprint: block / throttle / monitor / allow.
    FpSet {
        /// A JA4, a JA4_r, a p0f SYN signature text, `syn:0x<key>` or `hello:0x<key>`.
        fp: String,
        action: String,
        #[serde(default)]
        class: Option<String>,
        #[serde(default)]
        ttl_secs: Option<u64>,
        #[serde(default)]
        permanent: bool,
        #[serde(default)]
        reason: String,
    },
    /// Removes the verdict on a fingerprint.
    FpRemove {
        fp: String,
    },
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ListWhat {
    All,
    Allow,
    Deny,
    Decisions,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ImportInto {
    Allow,
    Deny,
    Block,
}

#[derive(Debug, Serialize, Deserialize)]
struct RequestEnvelope {
    version: u32,
    #[serde(flatten)]
    request: Request,
}

/// Failure classes, also the CLI's exit codes.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request could not be understood (malformed, oversized, unknown, wrong version, bad value).
    BadRequest,
    /// Understood but refused (lockout guard).
    Refused,
    /// Nothing to do (e.g. no such decision).
    NotFound,
    /// Applying it failed.
    Failed,
}

impl ErrorKind {
    pub fn exit_code(self) -> u8 {
        match self {
            Self::Failed => 1,
            Self::BadRequest | Self::Refused => 2,
            Self::NotFound => 3,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Error)]
#[error("{message}")]
pub struct ControlError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ControlError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct ResponseEnvelope {
    version: u32,
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<ControlError>,
}

/// Handles one request; implemented by the daemon.
pub trait Handler: Send + 'static {
    fn handle(&mut self, request: Request) -> Result<Value, ControlError>;
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
        Ok(Ok(result)) => result,
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

/// Parses one request line (pure; fuzzable).
pub fn decode_request(line: &[u8]) -> Result<Request, ControlError> {
    let mut value: Value = serde_json::from_slice(line)
        .map_err(|e| ControlError::new(ErrorKind::BadRequest, format!("malformed JSON: {e}")))?;
    let version = value
        .as_object_mut()
        .and_then(|o| o.remove("version"))
        .and_then(|v| v.as_u64());
    if version != Some(PROTOCOL_VERSION as u64) {
        return Err(ControlError::new(
            ErrorKind::BadRequest,
            format!(
                "unsupported protocol version {}; this daemon speaks {PROTOCOL_VERSION} (is the CLI from another aqd release?)",
                version.map(|v| v.to_string()).unwrap_or_else(|| "(none)".into())
            ),
        ));
    }
    // Deserialized without the envelope so unknown fields are rejected (serde's flatten would accept them).
    serde_json::from_value(value)
        .map_err(|e| ControlError::new(ErrorKind::BadRequest, format!("invalid request: {e}")))
}

fn encode_response(response: Result<Value, ControlError>) -> Vec<u8> {
    let envelope = match response {
        Ok(result) => ResponseEnvelope {
            version: PROTOCOL_VERSION,
            ok: true,
            result: Some(result),
            error: None,
        },
        Err(error) => ResponseEnvelope {
            version: PROTOCOL_VERSION,
            ok: false,
            result: None,
            error: Some(error),
        },
    };
    let mut out = serde_json::to_vec(&envelope).expect("responses serialize");
    out.push(b'\n');
    out
}

/// Why the client could not get an answer.
#[derive(Debug, Error)]
pub enum ClientError {
    /// No daemon is listening (socket missing or connection refused).
    #[error("the aqd daemon is not running (no socket at {path})")]
    NotRunning { path: String },
    #[error("control socket {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("bad response from the daemon: {0}")]
    BadResponse(String),
    #[error(transparent)]
    Daemon(#[from] ControlError),
}

/// Sends one request and waits for the answer (blocking; the CLI is synchronous).
pub fn call(path: &Path, request: &Request) -> Result<Value, ClientError> {
    let display = path.display().to_string();
    let mut stream = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Err(ClientError::NotRunning { path: display });
        }
        Err(source) => {
            return Err(ClientError::Io {
                path: display,
                source,
            });
        }
    };
    let io = |source| ClientError::Io {
        path: path.display().to_string(),
        source,
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .map_err(io)?;
    let mut line = serde_json::to_vec(&RequestEnvelope {
        version: PROTOCOL_VERSION,
        request: request.clone(),
    })
    .expect("requests serialize");
    line.push(b'\n');
    stream.write_all(&line).map_err(io)?;
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply).map_err(io)?;
    let envelope: ResponseEnvelope =
        serde_json::from_str(&reply).map_err(|e| ClientError::BadResponse(format!("{e}: {reply:?}")))?;
    match (envelope.ok, envelope.result, envelope.error) {
        (true, Some(result), _) => Ok(result),
        (false, _, Some(error)) => Err(ClientError::Daemon(error)),
        _ => Err(ClientError::BadResponse(reply)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_a_versioned_request() {
        let r =
            decode_request(br#"{"version":1,"cmd":"decide","target":"192.0.2.1","action":"block"}"#).unwrap();
        assert!(matches!(r, Request::Decide { ref target, .. } if target == "192.0.2.1"));
        let r =
            decode_request(br#"{"version":1,"cmd":"fp_set","fp":"syn:0x1","action":"block","ttl_secs":60}"#)
                .unwrap();
        assert!(matches!(r, Request::FpSet { ref fp, ttl_secs: Some(60), .. } if fp == "syn:0x1"));
        assert_eq!(
            decode_request(br#"{"version":1,"cmd":"fp_list"}"#).unwrap(),
            Request::FpList {}
        );
    }

    #[test]
    fn rejects_bad_requests_with_a_reason() {
        for (line, needle) in [
            (&b"{not json"[..], "malformed JSON"),
            (br#"{"cmd":"status"}"#, "protocol version (none)"),
            (br#"{"version":7,"cmd":"status"}"#, "version 7"),
            (br#"{"version":1,"cmd":"format_disk"}"#, "invalid request"),
            (br#"{"version":1,"cmd":"remove"}"#, "target"),
            (br#"{"version":1,"cmd":"status","extra":1}"#, "invalid request"),
            (br#"{"version":1,"cmd":"fp_set","fp":"x"}"#, "action"),
            (br#"{"version":1,"cmd":"fp_remove"}"#, "fp"),
        ] {
            let e = decode_request(line).unwrap_err();
            assert_eq!(e.kind, ErrorKind::BadRequest);
            assert!(e.message.contains(needle), "{needle}: {}", e.message);
        }
    }

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
        fn handle(&mut self, request: Request) -> Result<Value, ControlError> {
            self.seen += 1;
            if request == (Request::Status {}) {
                panic!("status handler broke on purpose");
            }
            Ok(serde_json::json!({ "seen": self.seen }))
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
                call(&client_path, &Request::FpList {}),
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
        assert_eq!(second.unwrap(), serde_json::json!({ "seen": 2 }));
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
            let answer = call(&client_path, &Request::FpList {});
            drop(idle);
            answer
        })
        .await
        .unwrap();
        assert_eq!(answer.unwrap(), serde_json::json!({ "seen": 1 }));
        assert_eq!(stats.accepted.load(Ordering::Relaxed), 11);
        assert_eq!(stats.evicted.load(Ordering::Relaxed), 8);
        assert_eq!(stats.rejected.load(Ordering::Relaxed), 0);
        server.abort();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! The control socket's client (the CLI, the tests and the benches): one request, one typed answer.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use thiserror::Error;

use super::{
    proto::{ControlError, Request, ResponseEnvelope, encode_request},
    views::{Response, UnexpectedAnswer},
};

/// How long the client waits for an answer (an import of 500k entries takes a while).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);

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
    #[error("bad response from the daemon ({reason}): {reply:?}")]
    BadResponse { reason: String, reply: String },
    #[error(transparent)]
    Unexpected(#[from] UnexpectedAnswer),
    #[error(transparent)]
    Daemon(#[from] ControlError),
}

/// Sends one request and waits for the answer (blocking; the CLI is synchronous).
pub fn call(path: &Path, request: &Request) -> Result<Response, ClientError> {
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
    stream.set_read_timeout(Some(ANSWER_TIMEOUT)).map_err(io)?;
    let mut line = encode_request(request);
    line.push(b'\n');
    stream.write_all(&line).map_err(io)?;
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply).map_err(io)?;
    let bad = |reason: String, reply: &str| ClientError::BadResponse {
        reason,
        reply: reply.to_string(),
    };
    let envelope: ResponseEnvelope = serde_json::from_str(&reply).map_err(|e| bad(e.to_string(), &reply))?;
    match (envelope.ok, envelope.result, envelope.error) {
        (true, Some(result), _) => Response::decode(request, result).map_err(|e| bad(e.to_string(), &reply)),
        (false, _, Some(error)) => Err(ClientError::Daemon(error)),
        _ => Err(bad("neither a result nor an error".into(), &reply)),
    }
}

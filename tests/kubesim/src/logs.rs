//! `pods/{name}/log`: the container's main-process output (its log file) as plain text.
//!
//! Contract: query `container` (default: the only container; 400 when there are several and
//! none is named), `tailLines=N` (last N lines), `limitBytes=N`, `follow=true`. With `follow`
//! the response is chunked and each appended piece is sent as soon as it is written; it ends
//! when the main process has exited and everything is sent, or when the client goes away.

use std::io::SeekFrom;
use std::sync::Arc;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::mpsc;

use crate::container::Container;
use crate::pods::Pod;
use crate::query::Query;
use crate::status::ApiError;

const CHUNK: usize = 32 * 1024;

/// What to stream.
#[derive(Debug)]
pub struct LogOptions {
    /// Keep streaming appended output.
    pub follow: bool,
    /// Only the last N lines.
    pub tail_lines: Option<usize>,
    /// Stop after this many bytes.
    pub limit_bytes: Option<u64>,
}

/// Picks the container and parses options.
pub fn prepare(pod: &Pod, query: &Query) -> Result<(Arc<Container>, LogOptions), ApiError> {
    let container = pod.container(query.get("container"))?.clone();
    let number = |key: &str| -> Result<Option<u64>, ApiError> {
        query
            .get(key)
            .map(|v| {
                v.parse::<u64>()
                    .map_err(|_| ApiError::bad_request(format!("invalid {key}: {v:?}")))
            })
            .transpose()
    };
    Ok((
        container,
        LogOptions {
            follow: query.flag("follow"),
            tail_lines: number("tailLines")?.map(|n| n as usize),
            limit_bytes: number("limitBytes")?,
        },
    ))
}

/// Streams the log into `tx` (one chunk per message; ends by dropping `tx`).
pub async fn stream(container: Arc<Container>, opts: LogOptions, tx: mpsc::Sender<Bytes>) {
    let mut len_rx = container.watch_log_len();
    let mut exit_rx = container.watch_exit();
    let Ok(mut file) = tokio::fs::File::open(container.log_path()).await else {
        return;
    };
    let mut offset = 0u64;
    let mut budget = opts.limit_bytes.unwrap_or(u64::MAX);
    if let Some(n) = opts.tail_lines {
        let mut all = Vec::new();
        if file.read_to_end(&mut all).await.is_err() {
            return;
        }
        offset = tail_start(&all, n) as u64;
    }
    loop {
        // Snapshot "has exited" before reading, so nothing written before exit is missed.
        let exited = exit_rx.borrow_and_update().is_some();
        let len = *len_rx.borrow_and_update();
        while offset < len && budget > 0 {
            if file.seek(SeekFrom::Start(offset)).await.is_err() {
                return;
            }
            let want = (len - offset).min(CHUNK as u64).min(budget) as usize;
            let mut buf = vec![0u8; want];
            let n = match file.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            buf.truncate(n);
            offset += n as u64;
            budget -= n as u64;
            if tx.send(Bytes::from(buf)).await.is_err() {
                return;
            }
        }
        if !opts.follow || exited || budget == 0 {
            return;
        }
        tokio::select! {
            r = len_rx.changed() => if r.is_err() { return },
            r = exit_rx.changed() => if r.is_err() { return },
            _ = tx.closed() => return,
        }
    }
}

/// Byte offset where the last `n` lines of `data` start.
fn tail_start(data: &[u8], n: usize) -> usize {
    if n == 0 {
        return data.len();
    }
    let body = data.strip_suffix(b"\n").unwrap_or(data);
    let mut seen = 0;
    for (i, b) in body.iter().enumerate().rev() {
        if *b == b'\n' {
            seen += 1;
            if seen == n {
                return i + 1;
            }
        }
    }
    0
}

#[cfg(test)]
mod tests {
    #[test]
    fn tail() {
        assert_eq!(super::tail_start(b"a\nb\nc\n", 2), 2);
        assert_eq!(super::tail_start(b"a\nb\nc", 1), 4);
        assert_eq!(super::tail_start(b"a\n", 5), 0);
        assert_eq!(super::tail_start(b"a\n", 0), 2);
    }
}

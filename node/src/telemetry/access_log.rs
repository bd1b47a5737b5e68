//! The access log: one JSON object per line per request, written when the response's last
//! byte has gone out (so streamed responses log their real size and duration).
//!
//! Each data-plane thread appends to its own buffer and writes it out in one call when it
//! passes 64 KiB or when the thread's flush timer fires (every 200 ms), so logging costs
//! no system call per request and no lock between threads.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::Serialize;

const FLUSH_AT: usize = 64 * 1024;

/// Where access-log lines go.
#[derive(Debug, Clone)]
pub enum Sink {
    Off,
    Stdout,
    File(Arc<LogFile>),
}

/// An access-log file that can be reopened under its path (after logrotate moved it).
#[derive(Debug)]
pub struct LogFile {
    path: PathBuf,
    file: Mutex<File>,
}

impl LogFile {
    fn open(path: &PathBuf) -> anyhow::Result<File> {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| anyhow::anyhow!("open access log {}: {e}", path.display()))
    }

    fn write_all(&self, bytes: &[u8]) -> std::io::Result<()> {
        self.file
            .lock()
            .expect("access log lock poisoned")
            .write_all(bytes)
    }
}

impl Sink {
    /// `off`, `stdout`, or a file path (appended to).
    pub fn open(target: &str) -> anyhow::Result<Sink> {
        Ok(match target {
            "off" => Sink::Off,
            "stdout" | "-" => Sink::Stdout,
            path => {
                let path = PathBuf::from(path);
                let file = Mutex::new(LogFile::open(&path)?);
                Sink::File(Arc::new(LogFile { path, file }))
            }
        })
    }

    /// Reopens a file sink under its path (SIGHUP, after log rotation). Lines buffered by
    /// the data-plane threads go to the new file.
    pub fn reopen(&self) -> anyhow::Result<()> {
        if let Sink::File(log) = self {
            let fresh = LogFile::open(&log.path)?;
            *log.file.lock().expect("access log lock poisoned") = fresh;
        }
        Ok(())
    }
}

/// One request, as logged.
#[derive(Debug, Serialize)]
pub struct Entry<'a> {
    #[serde(serialize_with = "rfc3339")]
    pub time: SystemTime,
    pub client: SocketAddr,
    pub protocol: &'static str,
    pub method: &'a str,
    pub host: &'a str,
    pub path: &'a str,
    pub route: Option<&'a str>,
    pub upstream: Option<&'a str>,
    pub endpoint: Option<SocketAddr>,
    pub status: u16,
    /// Set when the gateway answered by itself (the JSON error's code).
    pub error: Option<&'static str>,
    pub attempts: u32,
    pub request_bytes: u64,
    pub response_bytes: u64,
    /// Request head received to last response byte sent.
    pub duration_ms: f64,
    /// Upstream request sent to response head received (last attempt).
    pub upstream_ms: Option<f64>,
    /// LLM requests: the model asked for, the provider that answered, its tokens and
    /// whether the gateway counted them.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub llm: Option<LlmFields<'a>>,
}

/// The access log's LLM fields.
#[derive(Debug, Serialize)]
pub struct LlmFields<'a> {
    pub model: &'a str,
    pub provider: &'a str,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub tokens_estimated: bool,
    /// A stream that ended before the provider's end (cut, failed, or the client left).
    pub stream_incomplete: bool,
    /// The provider's id for the answer, to find it in the provider's own records.
    pub response_id: &'a str,
}

fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*t))
}

/// A data-plane thread's access-log writer.
#[derive(Debug)]
pub struct AccessLog {
    sink: Sink,
    buf: RefCell<Vec<u8>>,
}

impl AccessLog {
    pub fn new(sink: Sink) -> AccessLog {
        AccessLog {
            sink,
            buf: RefCell::new(Vec::with_capacity(FLUSH_AT + 4096)),
        }
    }

    pub fn enabled(&self) -> bool {
        !matches!(self.sink, Sink::Off)
    }

    pub fn write(&self, entry: &Entry<'_>) {
        if !self.enabled() {
            return;
        }
        let full = {
            let mut buf = self.buf.borrow_mut();
            if serde_json::to_writer(&mut *buf, entry).is_ok() {
                buf.push(b'\n');
            }
            buf.len() >= FLUSH_AT
        };
        if full {
            self.flush();
        }
    }

    pub fn flush(&self) {
        let mut buf = self.buf.borrow_mut();
        if buf.is_empty() {
            return;
        }
        let result = match &self.sink {
            Sink::Off => Ok(()),
            Sink::Stdout => std::io::stdout().lock().write_all(&buf),
            Sink::File(f) => f.write_all(&buf),
        };
        if let Err(e) = result {
            tracing::warn!("failed to write the access log: {e}");
        }
        buf.clear();
    }
}

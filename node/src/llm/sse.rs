//! Server-sent events (the HTML Living Standard's `text/event-stream`): an incremental
//! parser with a bound on what it holds, and the writer.
//!
//! Providers stream their answers as SSE; the parser is fed the body's pieces as they
//! arrive, however they are cut, and hands back whole events. It never holds more than
//! [`MAX_EVENT_BYTES`] of one event: a provider that sends more gets an error, not memory.

use bytes::{Bytes, BytesMut};

/// The most bytes one event may take (its `data` lines together).
pub const MAX_EVENT_BYTES: usize = 4 * 1024 * 1024;

/// One event: its `event:` name (empty when none was sent) and its `data:` lines joined
/// with `\n`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Event {
    pub event: String,
    pub data: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("a server-sent event was larger than {MAX_EVENT_BYTES} bytes")]
pub struct EventTooLarge;

/// Turns a byte stream into events.
#[derive(Default)]
pub struct Parser {
    /// Bytes of a line not yet ended.
    line: BytesMut,
    event: String,
    data: String,
    has_data: bool,
    /// The previous piece ended with `\r`: a `\n` starting the next one ends nothing.
    after_cr: bool,
}

impl Parser {
    /// Feeds a piece of the stream; pushes every event it completes onto `out`.
    pub fn feed(&mut self, mut piece: &[u8], out: &mut Vec<Event>) -> Result<(), EventTooLarge> {
        if self.after_cr && piece.first() == Some(&b'\n') {
            piece = &piece[1..];
        }
        self.after_cr = false;
        while let Some(end) = piece.iter().position(|&b| b == b'\n' || b == b'\r') {
            let (head, rest) = piece.split_at(end);
            if self.line.len() + head.len() > MAX_EVENT_BYTES {
                return Err(EventTooLarge);
            }
            self.line.extend_from_slice(head);
            let line = std::mem::take(&mut self.line);
            self.line_done(&line, out)?;
            // `\r\n` is one line end.
            piece = if rest[0] == b'\r' && rest.get(1) == Some(&b'\n') {
                &rest[2..]
            } else {
                if rest[0] == b'\r' && rest.len() == 1 {
                    self.after_cr = true;
                }
                &rest[1..]
            };
        }
        if self.line.len() + piece.len() + self.data.len() > MAX_EVENT_BYTES {
            return Err(EventTooLarge);
        }
        self.line.extend_from_slice(piece);
        Ok(())
    }

    fn line_done(&mut self, line: &[u8], out: &mut Vec<Event>) -> Result<(), EventTooLarge> {
        if line.is_empty() {
            if self.has_data || !self.event.is_empty() {
                out.push(Event {
                    event: std::mem::take(&mut self.event),
                    data: std::mem::take(&mut self.data),
                });
            }
            self.has_data = false;
            return Ok(());
        }
        if line[0] == b':' {
            return Ok(()); // a comment (a keep-alive)
        }
        let text = String::from_utf8_lossy(line);
        let (field, value) = match text.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (&*text, ""),
        };
        match field {
            "event" => self.event = value.to_string(),
            "data" => {
                if self.data.len() + value.len() + 1 > MAX_EVENT_BYTES {
                    return Err(EventTooLarge);
                }
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            _ => {} // id, retry and unknown fields: nothing a gateway needs
        }
        Ok(())
    }

    /// Bytes held for an event not yet complete.
    pub fn pending(&self) -> usize {
        self.line.len() + self.data.len()
    }
}

/// Writes one event: `event: <name>` when named, then the data (one `data:` line per
/// line), then the blank line that ends it.
pub fn write(event: Option<&str>, data: &str) -> Bytes {
    let mut out = String::with_capacity(data.len() + 32);
    if let Some(name) = event {
        out.push_str("event: ");
        out.push_str(name);
        out.push('\n');
    }
    for line in data.split('\n') {
        out.push_str("data: ");
        out.push_str(line);
        out.push('\n');
    }
    out.push('\n');
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_in_pieces(text: &str, cut: usize) -> Vec<Event> {
        let mut p = Parser::default();
        let mut out = Vec::new();
        for chunk in text.as_bytes().chunks(cut) {
            p.feed(chunk, &mut out).unwrap();
        }
        out
    }

    #[test]
    fn events_are_the_same_however_the_stream_is_cut() {
        let text = "event: message_start\r\ndata: {\"a\":1}\r\n\r\n: ping\n\ndata: x\ndata: y\n\ndata: [DONE]\n\n";
        let want = vec![
            Event {
                event: "message_start".into(),
                data: "{\"a\":1}".into(),
            },
            Event {
                event: String::new(),
                data: "x\ny".into(),
            },
            Event {
                event: String::new(),
                data: "[DONE]".into(),
            },
        ];
        for cut in 1..text.len() {
            assert_eq!(parse_in_pieces(text, cut), want, "cut {cut}");
        }
    }

    #[test]
    fn an_event_past_the_limit_is_an_error() {
        let mut p = Parser::default();
        let mut out = Vec::new();
        let big = vec![b'a'; 1024 * 1024];
        p.feed(b"data: ", &mut out).unwrap();
        let mut failed = false;
        for _ in 0..5 {
            if p.feed(&big, &mut out).is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed);
        assert!(p.pending() <= MAX_EVENT_BYTES);
    }

    #[test]
    fn written_events_parse_back() {
        let bytes = write(Some("content_block_delta"), "{\"x\":\"a\nb\"}");
        let mut p = Parser::default();
        let mut out = Vec::new();
        p.feed(&bytes, &mut out).unwrap();
        assert_eq!(out[0].event, "content_block_delta");
        assert_eq!(out[0].data, "{\"x\":\"a\nb\"}");
    }
}

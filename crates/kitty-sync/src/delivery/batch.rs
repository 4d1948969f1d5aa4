//! Batches: a page of due events cut to the byte bound and compressed once. A batch knows
//! nothing about the target it goes to, so one can be offered to several targets.

use std::io::Write;

use rusqlite::Connection;

use crate::error::{Error, Result};
use crate::store::selection::{DueEvent, DueQuery, select_due};

/// A selected batch and its compressed body.
pub struct Prepared {
    pub events: Vec<DueEvent>,
    pub body: Vec<u8>,
}

/// Selects the next page, cuts it to the byte bound and compresses it.
pub fn prefetch(conn: &Connection, query: DueQuery<'_>, batch_bytes: usize) -> Result<Option<Prepared>> {
    let page = select_due(conn, query)?;
    if page.is_empty() {
        return Ok(None);
    }
    let events = cut_by_bytes(page, batch_bytes);
    let body = encode_batch(&events)?;
    Ok(Some(Prepared { events, body }))
}

/// Keeps the leading events whose `{"events":[...]}` body stays within `max_bytes` (at least one).
pub fn cut_by_bytes(mut page: Vec<DueEvent>, max_bytes: usize) -> Vec<DueEvent> {
    let mut size = br#"{"events":[]}"#.len();
    let mut keep = 0;
    for (i, e) in page.iter().enumerate() {
        let next = size + e.envelope.len() + usize::from(i > 0);
        if i > 0 && next > max_bytes {
            break;
        }
        size = next;
        keep = i + 1;
    }
    page.truncate(keep);
    page
}

/// `{"events":[...]}` with each stored envelope embedded byte for byte, gzip-compressed.
pub fn encode_batch(batch: &[DueEvent]) -> Result<Vec<u8>> {
    let raw: usize = batch.iter().map(|e| e.envelope.len() + 1).sum();
    let mut gz = flate2::write::GzEncoder::new(Vec::with_capacity(raw / 4 + 64), flate2::Compression::fast());
    let io = |e: std::io::Error| Error::internal(format!("cannot compress a batch: {e}"), "run again");
    gz.write_all(b"{\"events\":[").map_err(io)?;
    for (i, event) in batch.iter().enumerate() {
        if i > 0 {
            gz.write_all(b",").map_err(io)?;
        }
        gz.write_all(event.envelope.as_slice()).map_err(io)?;
    }
    gz.write_all(b"]}").map_err(io)?;
    gz.finish().map_err(io)
}

/// For tests and tools: decompresses a batch body.
pub fn decode_batch(body: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(body), &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(seq: i64, size: usize) -> DueEvent {
        DueEvent { seq, event_id: format!("E{seq}"), envelope: vec![b'x'; size] }
    }

    #[test]
    fn byte_bound_keeps_at_least_one() {
        let page = vec![ev(1, 100), ev(2, 100), ev(3, 100)];
        assert_eq!(cut_by_bytes(page.clone(), 13 + 201).len(), 2);
        assert_eq!(cut_by_bytes(page.clone(), 10).len(), 1);
        assert_eq!(cut_by_bytes(page, 10_000).len(), 3);
    }

    #[test]
    fn encoded_body_embeds_envelopes_verbatim() {
        let batch = vec![
            DueEvent { seq: 1, event_id: "a".into(), envelope: br#"{"b": 1, "a": "\u00e9"}"#.to_vec() },
            DueEvent { seq: 2, event_id: "b".into(), envelope: br#"{"x":2}"#.to_vec() },
        ];
        let body = decode_batch(&encode_batch(&batch).unwrap()).unwrap();
        assert_eq!(body, br#"{"events":[{"b": 1, "a": "\u00e9"},{"x":2}]}"#.to_vec());
    }
}

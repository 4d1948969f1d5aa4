//! Batches: a page of due events cut to the byte bound and compressed once. A batch knows
//! nothing about the target it goes to, so one can be offered to several targets.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};

use rusqlite::Connection;

use crate::error::{Error, Result};
use crate::store::selection::{DueEvent, DueQuery, load_envelopes, select_due, select_due_heads};

/// A selected batch and its compressed body.
#[derive(Debug)]
pub struct Prepared {
    pub events: Vec<DueEvent>,
    pub body: Vec<u8>,
}

/// Selects the next page, cuts it to the byte bound and compresses it. With `shared` (a
/// fan-out run), a batch whose events another target already selected is taken from there:
/// the journal is read and the body compressed once for every target that needs it.
pub fn prefetch(
    conn: &Connection,
    query: DueQuery<'_>,
    batch_bytes: usize,
    shared: Option<&SharedBatches>,
) -> Result<Option<Arc<Prepared>>> {
    let Some(shared) = shared else {
        let page = select_due(conn, query)?;
        if page.is_empty() {
            return Ok(None);
        }
        let events = cut_by_bytes(page, batch_bytes);
        let body = encode_batch(&events)?;
        return Ok(Some(Arc::new(Prepared { events, body })));
    };
    let mut heads = select_due_heads(conn, query)?;
    if heads.is_empty() {
        return Ok(None);
    }
    heads.truncate(keep_within(heads.iter().map(|h| h.envelope_len), batch_bytes));
    let seqs: Vec<i64> = heads.iter().map(|h| h.seq).collect();
    shared.get_or_prepare(seqs, || {
        let events = load_envelopes(conn, &heads)?;
        let body = encode_batch(&events)?;
        Ok(Prepared { events, body })
    })
}

/// How many leading envelopes of these sizes fit a `{"events":[...]}` body of `max_bytes`
/// (at least one).
fn keep_within(sizes: impl Iterator<Item = usize>, max_bytes: usize) -> usize {
    let mut size = br#"{"events":[]}"#.len();
    let mut keep = 0;
    for (i, len) in sizes.enumerate() {
        let next = size + len + usize::from(i > 0);
        if i > 0 && next > max_bytes {
            break;
        }
        size = next;
        keep = i + 1;
    }
    keep
}

/// Keeps the leading events whose `{"events":[...]}` body stays within `max_bytes` (at least one).
pub fn cut_by_bytes(mut page: Vec<DueEvent>, max_bytes: usize) -> Vec<DueEvent> {
    page.truncate(keep_within(page.iter().map(|e| e.envelope.len()), max_bytes));
    page
}

/// Batches of one fan-out run, by the exact events they hold. Targets catching up side by
/// side select the same events, so the first to need a batch reads and compresses it and the
/// others take it; targets whose selections differ (filters, frontiers) simply miss. Bounded:
/// the oldest batches make way, so a target far behind the others reads its own.
#[derive(Debug, Default)]
pub struct SharedBatches {
    entries: Mutex<VecDeque<(Vec<i64>, Slot)>>,
    prepared: std::sync::atomic::AtomicU64,
}

/// One batch, filled by the first target that needs it; the others wait for it rather than
/// read it again.
type Slot = Arc<Mutex<Option<Arc<Prepared>>>>;

/// Batches kept for the targets that come after the first (a few per target is plenty: they
/// move at the speed of their receivers, and a straggler reads for itself).
const SHARED_BATCHES: usize = 32;

impl SharedBatches {
    fn get_or_prepare(
        &self,
        seqs: Vec<i64>,
        prepare: impl FnOnce() -> Result<Prepared>,
    ) -> Result<Option<Arc<Prepared>>> {
        let slot = self.slot(seqs);
        let mut filled = slot.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(prepared) = filled.as_ref() {
            return Ok(Some(Arc::clone(prepared)));
        }
        let prepared = Arc::new(prepare()?);
        self.prepared.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        *filled = Some(Arc::clone(&prepared));
        Ok(Some(prepared))
    }

    fn slot(&self, seqs: Vec<i64>) -> Slot {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, slot)) = entries.iter().find(|(key, _)| *key == seqs) {
            return Arc::clone(slot);
        }
        let slot = Slot::default();
        entries.push_back((seqs, Arc::clone(&slot)));
        if entries.len() > SHARED_BATCHES {
            entries.pop_front();
        }
        slot
    }

    /// How many batches were read and compressed (the rest were shared).
    pub fn prepared(&self) -> u64 {
        self.prepared.load(std::sync::atomic::Ordering::Relaxed)
    }
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
    use crate::event_journal::{CapturePolicy, Journal, NewEvent};
    use crate::home::Home;
    use crate::store::Store;

    fn store_with(types: &[&str]) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&Home::at(dir.path())).unwrap();
        let mut journal = Journal::new(&mut store, CapturePolicy::default());
        for (i, t) in types.iter().enumerate() {
            let event = NewEvent {
                event_type: t.to_string(),
                payload: Some(serde_json::json!({ "i": i })),
                ..NewEvent::default()
            };
            journal.append(event).unwrap();
        }
        (dir, store)
    }

    fn query(target: i64, types: Option<&str>) -> DueQuery<'_> {
        DueQuery { target, epoch: 0, team: None, types, from_seq: 0, limit: 1000 }
    }

    #[test]
    fn targets_selecting_the_same_events_share_one_read_and_one_body() {
        let (_dir, store) = store_with(&["A", "B", "A", "B"]);
        let shared = SharedBatches::default();
        let first = prefetch(store.conn(), query(1, None), 1 << 20, Some(&shared)).unwrap().unwrap();
        let second = prefetch(store.conn(), query(2, None), 1 << 20, Some(&shared)).unwrap().unwrap();
        assert!(Arc::ptr_eq(&first, &second), "the second target read the batch again");
        assert_eq!(shared.prepared(), 1);
        let alone = prefetch(store.conn(), query(3, None), 1 << 20, None).unwrap().unwrap();
        assert_eq!(alone.events, first.events, "shared or not, the same events");
        assert_eq!(decode_batch(&alone.body).unwrap(), decode_batch(&first.body).unwrap(), "and the same bytes");
        // Another selection (a type filter) is its own batch.
        let filtered = prefetch(store.conn(), query(4, Some(r#"["A"]"#)), 1 << 20, Some(&shared)).unwrap().unwrap();
        assert_eq!(filtered.events.len(), 2);
        assert_eq!(shared.prepared(), 2);
        // The byte bound cuts shared batches exactly like unshared ones.
        let cut = prefetch(store.conn(), query(5, None), 60, Some(&shared)).unwrap().unwrap();
        let cut_alone = prefetch(store.conn(), query(6, None), 60, None).unwrap().unwrap();
        assert_eq!(cut.events, cut_alone.events);
    }

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

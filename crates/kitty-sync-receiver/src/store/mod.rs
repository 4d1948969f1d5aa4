//! Storage behind the receiver. The HTTP layer only sees [`AnyStore`]: either a blocking
//! [`ReceiverStore`] (SQLite, called from `spawn_blocking`) or the asynchronous PostgreSQL
//! store, awaited on the server's runtime like any other I/O.

mod any;
mod group;
pub mod location;
pub mod postgres;
pub mod sqlite;

pub use any::AnyStore;

use std::collections::BTreeMap;
use std::path::PathBuf;

use jiff::Timestamp;
use serde::{Serialize, Serializer};
use serde_json::value::RawValue;

/// One valid event to store, borrowed from the request body.
#[derive(Debug, Clone, Copy)]
pub struct NewEvent<'a> {
    pub event_id: &'a str,
    pub event_type: &'a str,
    /// The event exactly as it appeared in the request JSON.
    pub envelope: &'a str,
}

/// One valid event to store, owned: it outlives the request body it came from.
#[derive(Debug, Clone)]
pub struct EventRow {
    pub event_id: String,
    pub event_type: String,
    pub envelope: String,
}

impl EventRow {
    pub fn borrowed(&self) -> NewEvent<'_> {
        NewEvent { event_id: &self.event_id, event_type: &self.event_type, envelope: &self.envelope }
    }
}

impl From<&NewEvent<'_>> for EventRow {
    fn from(event: &NewEvent<'_>) -> Self {
        EventRow {
            event_id: event.event_id.to_string(),
            event_type: event.event_type.to_string(),
            envelope: event.envelope.to_string(),
        }
    }
}

/// What storing one event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ingested {
    /// First time this `event_id` was seen: stored.
    Stored,
    /// The `event_id` was already stored (earlier, or earlier in the same batch): untouched.
    Duplicate,
}

/// One batch request as answered, for the `requests` audit trail.
#[derive(Debug, Clone)]
pub struct BatchRecord {
    pub received_at: Timestamp,
    pub http_status: u16,
    /// Events in the body; `None` when the body was never parsed (auth, fault, bad body).
    pub event_count: Option<u32>,
    /// Events answered `rejected` (the store adds `success` / `duplicate` itself).
    pub rejected: u32,
    /// The error answered for a non-200 response.
    pub error: Option<String>,
}

/// One stored event, as listed. Serialises with the envelope embedded as JSON, byte for byte.
#[derive(Debug, Clone, Serialize)]
pub struct StoredEvent {
    pub seq: i64,
    pub event_id: String,
    pub event_type: String,
    /// RFC 3339, UTC.
    pub received_at: String,
    /// The envelope bytes exactly as received.
    #[serde(serialize_with = "embed_envelope")]
    pub envelope: String,
}

impl StoredEvent {
    /// The envelope as embeddable JSON, byte for byte.
    pub fn envelope_json(&self) -> Box<RawValue> {
        RawValue::from_string(self.envelope.clone()).unwrap_or_else(|_| {
            // Stored envelopes always came from a parsed request; this is for a hand-edited
            // database only.
            serde_json::value::to_raw_value(&self.envelope).unwrap_or_default()
        })
    }
}

fn embed_envelope<S: Serializer>(envelope: &str, serializer: S) -> Result<S::Ok, S::Error> {
    match RawValue::from_string(envelope.to_string()) {
        Ok(raw) => raw.serialize(serializer),
        Err(_) => serializer.serialize_str(envelope),
    }
}

/// Counts that describe what a store holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub event_count: u64,
    /// Highest `seq` at the moment of the count (0 when empty), read in the same snapshot.
    pub last_seq: i64,
    pub batch_requests: u64,
    /// Batch requests by the HTTP status they were answered with.
    pub batch_requests_by_status: BTreeMap<u16, u64>,
}

/// A receiver's storage with a blocking interface (SQLite).
pub trait ReceiverStore: Send + Sync + 'static {
    /// Random identity created with the database: a wiped store gets a new one.
    fn server_instance_id(&self) -> &str;

    /// Stores `events` (in order) and the batch record atomically: either all of it is durable
    /// when this returns `Ok`, or none of it is. Returns one [`Ingested`] per event.
    fn ingest(&self, record: &BatchRecord, events: &[NewEvent<'_>]) -> Result<Vec<Ingested>, StoreError>;

    /// Records a batch request that stored nothing (an error response).
    fn record_request(&self, record: &BatchRecord) -> Result<(), StoreError>;

    /// Events with `seq > after`, in `seq` order, at most `limit`.
    fn events_after(&self, after: i64, limit: usize) -> Result<Vec<StoredEvent>, StoreError>;

    fn stats(&self) -> Result<StoreStats, StoreError>;
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("receiver database {} does not exist", path.display())]
    Missing { path: PathBuf },
    #[error("directory {} of the receiver database does not exist", dir.display())]
    MissingDirectory { dir: PathBuf },
    #[error("{} is not a kitty-sync receiver database", path.display())]
    NotAReceiverDatabase { path: PathBuf },
    #[error("receiver database {database} has schema version {found}; this build knows up to {known}")]
    NewerSchema { database: String, found: i64, known: i64 },
    /// A database server that cannot be reached or refuses the connection at start.
    #[error("cannot connect to {database}: {source}")]
    Unreachable {
        database: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A database without a receiver schema, opened for reading.
    #[error("{database} holds no kitty-sync receiver schema")]
    NoSchema { database: String },
    #[error("{count} events in one batch; at most {max} can be stored at once")]
    TooManyEvents { count: usize, max: usize },
    #[error("the receiver database was opened read-only")]
    ReadOnly,
    /// The backend is momentarily unavailable (e.g. locked by another process); retrying helps.
    #[error("{context}: {source}")]
    Busy {
        context: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{context}: {source}")]
    Backend {
        context: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

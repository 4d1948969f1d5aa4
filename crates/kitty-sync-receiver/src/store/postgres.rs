//! The shared store: PostgreSQL, for any number of `receiver serve` replicas on one database.
//!
//! - **Exactly once.** One `INSERT … ON CONFLICT (event_id) DO NOTHING RETURNING` per batch:
//!   the unique index decides, also between replicas. Rows go in in `event_id` order, so two
//!   batches that share ids wait on each other in one direction only and cannot deadlock.
//! - **One statement per batch**, so a batch (its events and its request row) commits whole or
//!   not at all, with nothing to roll back when a connection dies half-way.
//! - **Listing that never skips.** `seq` is the inserting transaction's id (`xid8`) shifted
//!   left by [`ORDINAL_BITS`], plus the event's position in the request. A transaction that
//!   commits later than a reader's snapshot has an id ≥ that snapshot's `xmin`, hence a
//!   larger `seq` than every row whose id is below `xmin`. A page therefore stops at the first
//!   row whose transaction is not below `xmin`: everything returned is settled, and anything
//!   that still commits lands after it. `seq` values are sparse and large; only their order
//!   matters. The price: a transaction left open anywhere in the cluster holds the listing
//!   back (never makes it skip) until it ends.
//! - **The database owns the identity.** `server_instance_id` is created by the first schema
//!   migration; a dropped and re-created schema gets a new one. A replica that finds the schema
//!   gone re-creates it (under the same lock) rather than failing every request.
//! - **Migrations** are numbered and applied under `pg_advisory_xact_lock`, so replicas that
//!   start together apply each exactly once; a newer schema is refused.
//!
//! Tables are created unqualified, in the first schema of the connection's `search_path`
//! (`public` by default; `?options=-csearch_path%3DNAME` in the URL picks another).

use std::collections::HashSet;
use std::error::Error as StdError;
use std::time::Duration;

use deadpool_postgres::{Manager, Object, Pool, PoolError, Runtime};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

use super::location::PgLocation;
use super::{BatchRecord, EventRow, Ingested, StoreError, StoreStats, StoredEvent};
use crate::store::sqlite::format_timestamp;

/// Bits of `seq` below the transaction id: the most events one batch may store.
pub const ORDINAL_BITS: u32 = 24;
const MAX_BATCH_EVENTS: usize = 1 << ORDINAL_BITS;

/// Serialises schema changes between replicas; any constant works, it only has to be ours.
const MIGRATION_LOCK: i64 = 0x6b73_7276_0000_0001;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a request waits for a pooled connection before it is answered 503.
const POOL_WAIT: Duration = Duration::from_secs(10);
/// A batch that hits a deadlock or serialization failure is retried this many times.
const ATTEMPTS: usize = 3;

/// Schema steps, applied in order; step N brings the schema to version N + 1.
const MIGRATIONS: &[&str] = &["
CREATE TABLE kitty_receiver_meta (
    key   text PRIMARY KEY,
    value text NOT NULL
);
INSERT INTO kitty_receiver_meta (key, value) VALUES ('server_instance_id', gen_random_uuid()::text);
CREATE TABLE kitty_receiver_requests (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    received_at text NOT NULL,
    http_status integer NOT NULL,
    event_count integer,
    success     integer NOT NULL DEFAULT 0,
    duplicate   integer NOT NULL DEFAULT 0,
    rejected    integer NOT NULL DEFAULT 0,
    error       text
);
CREATE TABLE kitty_receiver_events (
    seq         bigint PRIMARY KEY,
    event_id    text NOT NULL UNIQUE,
    event_type  text NOT NULL,
    received_at text NOT NULL,
    xid         xid8 NOT NULL,
    envelope    text NOT NULL
);
"];
const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// `$1..$3` the events (id, type, envelope) in request order, `$4` the receive time, `$5` the
/// events in the body, `$6` the events offered for storage, `$7` the events rejected.
const INGEST: &str = "
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[]) WITH ORDINALITY AS t(event_id, event_type, envelope, ord)
), stored AS (
    INSERT INTO kitty_receiver_events (seq, event_id, event_type, received_at, xid, envelope)
    SELECT (pg_current_xact_id()::text::bigint << 24) + input.ord - 1, input.event_id, input.event_type, $4,
           pg_current_xact_id(), input.envelope
    FROM input ORDER BY input.event_id
    ON CONFLICT (event_id) DO NOTHING
    RETURNING event_id
), request AS (
    INSERT INTO kitty_receiver_requests (received_at, http_status, event_count, success, duplicate, rejected)
    SELECT $4, 200, $5, count(*), $6 - count(*), $7 FROM stored
)
SELECT event_id FROM stored";

const LIST: &str = "
WITH horizon AS (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS xmin)
SELECT seq, event_id, event_type, received_at, envelope, xid < horizon.xmin
FROM kitty_receiver_events, horizon WHERE seq > $1 ORDER BY seq LIMIT $2";

const RECORD_REQUEST: &str = "
INSERT INTO kitty_receiver_requests (received_at, http_status, event_count, rejected, error)
VALUES ($1, $2, $3, $4, $5)";

/// One statement, so every count comes from one snapshot: a row per answered status (or one
/// row with NULL status when no batch was recorded yet), each with the event totals.
const STATS: &str = "
SELECT e.n, e.last_seq, r.http_status, r.n
FROM (SELECT count(*) AS n, coalesce(max(seq), 0) AS last_seq FROM kitty_receiver_events) e
LEFT JOIN (SELECT http_status, count(*) AS n FROM kitty_receiver_requests GROUP BY http_status) r ON true";

const INSTANCE_ID: &str = "SELECT value FROM kitty_receiver_meta WHERE key = 'server_instance_id'";

/// Runs `$body` (an expression using the pooled connection `$client`) and, when the schema
/// had to be re-created first, runs it again. A macro rather than a closure-taking function:
/// the request futures stay `Send` without higher-ranked closure bounds.
macro_rules! with_schema {
    ($store:expr, $client:ident => $body:expr) => {{
        let $client = $store.client().await?;
        let mut repaired = false;
        loop {
            match $body {
                Err(e) if !repaired && $store.repair_schema(&e).await => repaired = true,
                result => break result.map_err(pg_error("receiver database request failed")),
            }
        }
    }};
}

pub struct PgStore {
    pool: Pool,
    location: PgLocation,
    /// A read-only store never creates or migrates the schema.
    writable: bool,
}

impl PgStore {
    /// Connects, applies pending schema migrations (creating the schema and its
    /// `server_instance_id` in an empty database), and sets up a pool of `pool_size`
    /// connections, opened on demand by the runtime that uses them.
    pub async fn connect(location: &PgLocation, pool_size: usize) -> Result<PgStore, StoreError> {
        let client = connect_once(location).await?;
        migrate(&client, location).await?;
        Self::with_pool(location, pool_size, true)
    }

    /// Connects to an existing receiver schema without changing anything.
    pub async fn connect_read_only(location: &PgLocation) -> Result<PgStore, StoreError> {
        let client = connect_once(location).await?;
        let version = schema_version(&client).await?;
        if version == 0 {
            return Err(StoreError::NoSchema { database: location.to_string() });
        }
        check_version(version, location)?;
        Self::with_pool(location, 2, false)
    }

    /// [`PgStore::connect`] for synchronous callers (not from inside a Tokio runtime): the
    /// start-up work runs on a runtime of its own, and the pool's connections are opened
    /// later by whichever runtime serves.
    pub fn open(location: &PgLocation, pool_size: usize) -> Result<PgStore, StoreError> {
        block_on(PgStore::connect(location, pool_size))
    }

    /// [`PgStore::connect_read_only`] for synchronous callers.
    pub fn open_read_only(location: &PgLocation) -> Result<PgStore, StoreError> {
        block_on(PgStore::connect_read_only(location))
    }

    fn with_pool(location: &PgLocation, pool_size: usize, writable: bool) -> Result<PgStore, StoreError> {
        let manager = Manager::new(location.config().clone(), NoTls);
        let pool = Pool::builder(manager)
            .max_size(pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(POOL_WAIT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| StoreError::Backend { context: "cannot set up the connection pool", source: Box::new(e) })?;
        Ok(PgStore { pool, location: location.clone(), writable })
    }

    pub fn location(&self) -> &PgLocation {
        &self.location
    }

    async fn client(&self) -> Result<Object, StoreError> {
        self.pool.get().await.map_err(pool_error)
    }

    /// A writable store that finds its schema gone (dropped by an operator) re-creates it and
    /// runs the request once more, rather than failing every request until a restart. The
    /// migration runs as a task of its own on a connection of its own: a request cancelled by
    /// its client must not hand a pooled connection back in the middle of the transaction.
    async fn repair_schema(&self, error: &tokio_postgres::Error) -> bool {
        if !self.writable || error.code() != Some(&SqlState::UNDEFINED_TABLE) {
            return false;
        }
        let location = self.location.clone();
        let repair = tokio::spawn(async move { migrate(&connect_once(&location).await?, &location).await });
        match repair.await {
            Ok(Ok(())) => {
                eprintln!("kitty-sync receiver: the receiver schema was missing in {}; re-created it", self.location);
                true
            }
            Ok(Err(e)) => {
                eprintln!(
                    "kitty-sync receiver: the receiver schema is missing in {} and cannot be re-created: {e}",
                    self.location
                );
                false
            }
            Err(e) => {
                eprintln!("kitty-sync receiver: re-creating the receiver schema failed: {e}");
                false
            }
        }
    }

    pub async fn server_instance_id(&self) -> Result<String, StoreError> {
        let row = with_schema!(self, c => c.query_opt(INSTANCE_ID, &[]).await)?;
        match row {
            Some(row) => row.try_get(0).map_err(pg_error("cannot read the server instance id")),
            None => Err(StoreError::NoSchema { database: self.location.to_string() }),
        }
    }

    /// Stores `events` and the batch record in one statement. Ids repeated inside the batch
    /// are answered `duplicate` here; the database decides between batches.
    pub async fn ingest(&self, record: &BatchRecord, events: &[EventRow]) -> Result<Vec<Ingested>, StoreError> {
        if !self.writable {
            return Err(StoreError::ReadOnly);
        }
        if events.len() >= MAX_BATCH_EVENTS {
            return Err(StoreError::TooManyEvents { count: events.len(), max: MAX_BATCH_EVENTS - 1 });
        }
        let mut seen = HashSet::with_capacity(events.len());
        let first: Vec<bool> = events.iter().map(|e| seen.insert(e.event_id.as_str())).collect();
        let offered: Vec<&EventRow> = events.iter().zip(&first).filter(|(_, f)| **f).map(|(e, _)| e).collect();
        let ids: Vec<&str> = offered.iter().map(|e| e.event_id.as_str()).collect();
        let types: Vec<&str> = offered.iter().map(|e| e.event_type.as_str()).collect();
        let envelopes: Vec<&str> = offered.iter().map(|e| e.envelope.as_str()).collect();
        let received_at = format_timestamp(record.received_at);
        let event_count = record.event_count.map(|n| i32::try_from(n).unwrap_or(i32::MAX));
        let offered_count = events.len() as i64;
        let rejected = i32::try_from(record.rejected).unwrap_or(i32::MAX);
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 7] =
            [&ids, &types, &envelopes, &received_at, &event_count, &offered_count, &rejected];
        let stored_rows = with_schema!(self, c => async {
            let statement = c.prepare_cached(INGEST).await?;
            let mut attempt = 1;
            loop {
                match c.query(&statement, &params).await {
                    Err(e) if attempt < ATTEMPTS && retryable(&e) => attempt += 1,
                    result => return result,
                }
            }
        }
        .await)?;
        let mut stored = HashSet::with_capacity(stored_rows.len());
        for row in &stored_rows {
            stored.insert(row.try_get::<_, String>(0).map_err(pg_error("cannot read the stored ids"))?);
        }
        Ok(events
            .iter()
            .zip(first)
            .map(
                |(e, first)| if first && stored.contains(&e.event_id) { Ingested::Stored } else { Ingested::Duplicate },
            )
            .collect())
    }

    pub async fn record_request(&self, record: &BatchRecord) -> Result<(), StoreError> {
        if !self.writable {
            return Err(StoreError::ReadOnly);
        }
        let received_at = format_timestamp(record.received_at);
        let status = i32::from(record.http_status);
        let count = record.event_count.map(|n| i32::try_from(n).unwrap_or(i32::MAX));
        let rejected = i32::try_from(record.rejected).unwrap_or(i32::MAX);
        with_schema!(self, c => async {
            let statement = c.prepare_cached(RECORD_REQUEST).await?;
            c.execute(&statement, &[&received_at, &status, &count, &rejected, &record.error]).await
        }
        .await)
        .map(|_| ())
    }

    /// Settled events with `seq > after`, in `seq` order, at most `limit` (see the module
    /// comment): the page ends before the first event whose transaction is not yet settled.
    pub async fn events_after(&self, after: i64, limit: usize) -> Result<Vec<StoredEvent>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = with_schema!(self, c => async {
            let statement = c.prepare_cached(LIST).await?;
            c.query(&statement, &[&after, &limit]).await
        }
        .await)?;
        let mut events = Vec::with_capacity(rows.len());
        for row in rows {
            let settled: bool = row.try_get(5).map_err(pg_error("cannot read an event"))?;
            if !settled {
                break;
            }
            events.push(StoredEvent {
                seq: row.try_get(0).map_err(pg_error("cannot read an event"))?,
                event_id: row.try_get(1).map_err(pg_error("cannot read an event"))?,
                event_type: row.try_get(2).map_err(pg_error("cannot read an event"))?,
                received_at: row.try_get(3).map_err(pg_error("cannot read an event"))?,
                envelope: row.try_get(4).map_err(pg_error("cannot read an event"))?,
            });
        }
        Ok(events)
    }

    pub async fn stats(&self) -> Result<StoreStats, StoreError> {
        let rows = with_schema!(self, c => c.query(STATS, &[]).await)?;
        let read = pg_error("cannot count events");
        let mut stats = StoreStats::default();
        for row in rows {
            stats.event_count = u64::try_from(row.try_get::<_, i64>(0).map_err(&read)?).unwrap_or(0);
            stats.last_seq = row.try_get(1).map_err(&read)?;
            let (Some(status), Some(count)) =
                (row.try_get::<_, Option<i32>>(2).map_err(&read)?, row.try_get::<_, Option<i64>>(3).map_err(&read)?)
            else {
                continue;
            };
            let count = u64::try_from(count).unwrap_or(0);
            stats.batch_requests += count;
            stats.batch_requests_by_status.insert(u16::try_from(status).unwrap_or(0), count);
        }
        Ok(stats)
    }
}

fn block_on<T>(work: impl Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| StoreError::Backend { context: "cannot start the database runtime", source: Box::new(e) })?;
    runtime.block_on(work)
}

/// One connection outside the pool, for start-up; its driver task ends with the runtime.
async fn connect_once(location: &PgLocation) -> Result<Client, StoreError> {
    let (client, connection) = location
        .config()
        .connect(NoTls)
        .await
        .map_err(|e| StoreError::Unreachable { database: location.to_string(), source: explain(&e).into() })?;
    tokio::spawn(async move {
        // The connection ends when the client is dropped; an error here already reached the
        // client's caller.
        let _ = connection.await;
    });
    Ok(client)
}

async fn schema_version(client: &Client) -> Result<i64, StoreError> {
    let exists: bool = client
        .query_one("SELECT to_regclass('kitty_receiver_schema') IS NOT NULL", &[])
        .await
        .and_then(|row| row.try_get(0))
        .map_err(pg_error("cannot read the receiver schema version"))?;
    if !exists {
        return Ok(0);
    }
    client
        .query_one("SELECT coalesce(max(version), 0)::bigint FROM kitty_receiver_schema", &[])
        .await
        .and_then(|row| row.try_get(0))
        .map_err(pg_error("cannot read the receiver schema version"))
}

fn check_version(found: i64, location: &PgLocation) -> Result<(), StoreError> {
    if found > SCHEMA_VERSION {
        return Err(StoreError::NewerSchema { database: location.to_string(), found, known: SCHEMA_VERSION });
    }
    Ok(())
}

/// Brings the schema to [`SCHEMA_VERSION`] in one transaction under an advisory lock, so
/// replicas starting together apply each step exactly once (the others find it done).
async fn migrate(client: &Client, location: &PgLocation) -> Result<(), StoreError> {
    let failed = pg_error("cannot migrate the receiver schema");
    client.batch_execute("BEGIN").await.map_err(&failed)?;
    let result = migrate_in_transaction(client, location).await;
    let end = if result.is_ok() { "COMMIT" } else { "ROLLBACK" };
    let ended = client.batch_execute(end).await.map_err(&failed);
    result.and(ended)
}

async fn migrate_in_transaction(client: &Client, location: &PgLocation) -> Result<(), StoreError> {
    let failed = pg_error("cannot migrate the receiver schema");
    client.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await.map_err(&failed)?;
    let found = schema_version(client).await?;
    check_version(found, location)?;
    if found == 0 {
        client
            .batch_execute(
                "CREATE TABLE kitty_receiver_schema (
                    version    integer PRIMARY KEY,
                    applied_at timestamptz NOT NULL DEFAULT now()
                )",
            )
            .await
            .map_err(&failed)?;
    }
    for (index, step) in MIGRATIONS.iter().enumerate().skip(usize::try_from(found).unwrap_or(0)) {
        client.batch_execute(step).await.map_err(&failed)?;
        let version = i32::try_from(index + 1).unwrap_or(i32::MAX);
        client
            .execute("INSERT INTO kitty_receiver_schema (version) VALUES ($1)", &[&version])
            .await
            .map_err(&failed)?;
    }
    Ok(())
}

/// Deadlocks and serialization failures: the statement did nothing and may simply run again.
fn retryable(error: &tokio_postgres::Error) -> bool {
    matches!(error.code(), Some(code) if *code == SqlState::T_R_DEADLOCK_DETECTED
        || *code == SqlState::T_R_SERIALIZATION_FAILURE)
}

/// Errors a client should retry later: the database is down, restarting, out of connections,
/// or the connection broke.
fn transient(error: &tokio_postgres::Error) -> bool {
    if error.is_closed() || retryable(error) {
        return true;
    }
    if let Some(code) = error.code() {
        let code = code.code();
        return code.starts_with("08") || code.starts_with("57P") || code == "53300" || code == "53400";
    }
    let mut source = error.source();
    while let Some(cause) = source {
        if cause.is::<std::io::Error>() {
            return true;
        }
        source = cause.source();
    }
    false
}

fn pg_error(context: &'static str) -> impl Fn(tokio_postgres::Error) -> StoreError {
    move |error| {
        let source = explain(&error).into();
        if transient(&error) { StoreError::Busy { context, source } } else { StoreError::Backend { context, source } }
    }
}

/// The driver's error with its causes: its own text is often just "db error", and the
/// server's message (which never contains the password) is in the cause.
fn explain(error: &tokio_postgres::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

fn pool_error(error: PoolError) -> StoreError {
    let context = "cannot get a database connection";
    match error {
        PoolError::Backend(source) => pg_error(context)(source),
        other => StoreError::Busy { context, source: other.to_string().into() },
    }
}

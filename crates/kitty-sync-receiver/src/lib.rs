//! The built-in kitty-sync receiver: an HTTP server that speaks the batch protocol, answers
//! the health probe and lists what it stored.
//!
//! - `POST /api/v1/events/batch/` (with or without the trailing slash): `{"events":[...]}`,
//!   gzip (`Content-Encoding: gzip`, or sniffed by its magic bytes) or identity. 200 with one
//!   result per event in request order: `success` (stored now), `duplicate` (that `event_id`
//!   is already stored, from an earlier batch or earlier in this one) or `rejected` with an
//!   `error`. Each event is stored exactly as its bytes appeared in the request. Whole-batch
//!   answers store nothing: 400 (malformed gzip/JSON, not `{"events":[array]}`), 401 (bearer),
//!   413 (body over `max_body_bytes` after decompression, or a lone event over
//!   `max_event_bytes`), 415 (other content encodings), 429/503 (injected; with
//!   `Retry-After: 1`), 500 (storage). Error bodies are `{"error": "...", "details": [...]}`.
//! - `GET /api/v1/sync/health/`: `status`, `server_instance_id` (born with the database),
//!   `deployment_id`, `environment_name`, `git_sha`.
//! - `GET /api/v1/events/?after=SEQ&limit=N`: stored events by `seq` (keyset pagination;
//!   `limit` defaults to [`DEFAULT_LIST_LIMIT`], capped at [`MAX_LIST_LIMIT`]); `next_after` is
//!   the last `seq` returned, or `after` itself for an empty page.
//!
//! The HTTP layer ([`Server`], [`RunningServer`]) depends only on [`AnyStore`]: the embedded
//! [`SqliteStore`] (one operator) or [`PgStore`] (any number of replicas on one PostgreSQL). Every batch request is also recorded (time,
//! status, counts) so tests can tell whether anything was posted at all.

mod batch;
mod body;
pub mod config;
mod connections;
mod routes;
mod server;
pub mod store;
#[doc(hidden)]
pub mod testing;

pub use config::{BearerToken, ConnectionLimits, Deployment, Faults, ServerConfig};
pub use routes::{DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT};
pub use server::{RunningServer, ServeError, Server};
pub use store::location::{LocationError, PgLocation, StoreLocation};
pub use store::postgres::PgStore;
pub use store::sqlite::SqliteStore;
pub use store::{
    AnyStore, BatchRecord, EventRow, Ingested, NewEvent, ReceiverStore, StoreError, StoreStats, StoredEvent,
};

#[cfg(test)]
mod fuzz;

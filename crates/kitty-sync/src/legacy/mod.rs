//! Read-only access to spec-kitty ≤ 3.2.3 offline queues and 3.2.4–3.2.7's Python stores
//! (journals, delivery ledger and targets, per-project stores), and their one migration into
//! the journal and ledger.
//!
//! - [`discover`]: `queue.db`, then `queues/queue-<hex>.db` by digest; other files are ignored.
//! - [`migrate`]: imports every source in its own transaction; idempotent; `dry_run` writes
//!   nothing. Each event's stored bytes are exactly the legacy row's `data`.
//! - [`list_conflicts`] / [`resolve`]: the operator's view of, and decision on, events whose
//!   legacy versions disagree.
//! - [`conflict_summary`] / [`legacy_queues_report`]: cheap read-only sections for `status`.
//!
//! Sources are never written, renamed or deleted, and SQLite creates no file next to them.
//!
//! Where this differs from spec-kitty 3.2.4's migrator (deliberately, see the reference §8/§9):
//! both sides of a duplicate are canonicalised before comparing (3.2.4 compared the stored
//! bytes raw, so a Python-encoded envelope conflicted with itself); conflicts can be resolved;
//! provenance is `known:`/`unknown:<digest>` or `legacy:queue.db` (3.2.4 wrote
//! `unknown:legacy` and could never attach `known:`); a blocked migration exits 3, not 1.

mod conflicts;
mod migrate;
mod python;
mod report;
mod source;

pub use conflicts::{
    ConflictEntry, ConflictSummary, JOURNAL_SOURCE, Keep, OpenConflict, Resolution, conflict_summary, list_conflicts,
    resolve,
};
pub use migrate::{
    CreatedTarget, IdMismatch, InvalidRow, MAX_LISTED_INVALID_ROWS, MigrateOptions, MigrateProgress, MigrationReport,
    NOTE, SourceReport, Totals, migrate,
};
pub use python::NOT_CONSENTED;
pub use report::{
    BodyUploadCompatibility, LegacyQueueFile, LegacyQueuesReport, legacy_queues_report, stores_not_imported,
};
pub(crate) use source::check_header;
pub use source::{Discovery, LEGACY_QUEUE, QUEUES_DIR, ScopeStatus, SourceFile, SourceKind, discover, queue_digest};

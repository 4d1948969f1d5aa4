//! What `status` says about the legacy queues: which files exist, how many rows they hold,
//! and whether they were migrated. Read-only and infallible: a source that cannot be read is
//! reported with its reason instead of failing `status`.

use std::collections::HashMap;

use serde::Serialize;

use super::python;
use super::source::{self, ScopeStatus, SourceKind};
use crate::authority::TargetAuthority;
use crate::home::Home;
use crate::store::Store;

/// The contract's `status.legacy_queues` section. `body_upload` belongs to the separate
/// `status.body_upload_compatibility` section, so it is not serialised here.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LegacyQueuesReport {
    pub files: Vec<LegacyQueueFile>,
    /// Queue rows over all readable files.
    pub event_count: u64,
    #[serde(skip)]
    pub body_upload: BodyUploadCompatibility,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LegacyQueueFile {
    pub path: String,
    /// `legacy_queue`, or one of the Python stores (`journal`, `ledger`, `project_store`).
    pub kind: SourceKind,
    /// Hex digest of a scoped queue; null for `queue.db` and the Python stores.
    pub digest: Option<String>,
    /// Null for the Python stores (they have no scope digest).
    pub scope_status: Option<ScopeStatus>,
    /// Events in the file (0 for a ledger).
    pub event_count: u64,
    /// Rows in `body_upload_queue` plus `body_upload_failure_log`.
    pub body_upload_count: u64,
    /// Migrated, and the file holds as many rows as were read then (a Python store: unchanged
    /// since its import).
    pub migrated: bool,
    /// Why the file cannot be read (its counts are then 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The contract's `status.body_upload_compatibility` section: legacy rows that are never events.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct BodyUploadCompatibility {
    pub body_upload_queue_count: u64,
    pub body_upload_failure_log_count: u64,
}

/// Describes the home's legacy queues and Python stores. Cheap: row counts only, no payload
/// is read.
pub fn legacy_queues_report(home: &Home, authority: &TargetAuthority, store: Option<&Store>) -> LegacyQueuesReport {
    let discovery = source::discover(home);
    let migrated = store.map(migrated_sources).unwrap_or_default();
    let mut report = LegacyQueuesReport::default();
    for file in &discovery.sources {
        let mut entry = LegacyQueueFile {
            path: file.display_path(),
            kind: file.kind,
            digest: if file.kind.is_python() { None } else { file.digest.clone() },
            scope_status: file.scope(authority),
            event_count: 0,
            body_upload_count: 0,
            migrated: false,
            error: None,
        };
        let record = migrated.get(&file.relative);
        match source::open(file) {
            Ok(opened) => {
                entry.event_count = opened.event_rows();
                entry.body_upload_count = opened.body_upload_rows();
                entry.migrated = match record {
                    Some((_, Some(fingerprint))) => *fingerprint == python::fingerprint(file),
                    Some((rows, None)) => *rows == opened.event_rows(),
                    None => false,
                };
                report.event_count += opened.event_rows();
                let (queue, log) = opened.body_upload_counts();
                report.body_upload.body_upload_queue_count += queue;
                report.body_upload.body_upload_failure_log_count += log;
            }
            Err(reason) => entry.error = Some(reason),
        }
        report.files.push(entry);
    }
    if let Some((dir, reason)) = discovery.dir_error {
        report.files.push(LegacyQueueFile {
            path: dir.display().to_string(),
            kind: SourceKind::LegacyQueue,
            digest: None,
            scope_status: Some(ScopeStatus::Unknown),
            event_count: 0,
            body_upload_count: 0,
            migrated: false,
            error: Some(reason),
        });
    }
    report
}

/// Legacy queues and Python stores that `kitty-sync migrate` has not imported (or that
/// changed since): what a health check warns about. Read-only.
pub fn stores_not_imported(home: &Home, authority: &TargetAuthority, store: Option<&Store>) -> Vec<LegacyQueueFile> {
    legacy_queues_report(home, authority, store).files.into_iter().filter(|f| !f.migrated).collect()
}

/// `migrated_sources` as home-relative path → (rows read, fingerprint of a Python store). An
/// unreadable table counts as empty: `status` must not fail over a diagnostic.
fn migrated_sources(store: &Store) -> HashMap<String, (u64, Option<String>)> {
    let read = || -> rusqlite::Result<HashMap<String, (u64, Option<String>)>> {
        let mut stmt = store.conn().prepare("SELECT path, rows_read, fingerprint FROM migrated_sources")?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get::<_, String>(0)?, (r.get::<_, i64>(1)?.max(0) as u64, r.get::<_, Option<String>>(2)?)))
        })?;
        rows.collect()
    };
    read().unwrap_or_default()
}

//! What `status` says about the legacy queues: which files exist, how many rows they hold,
//! and whether they were migrated. Read-only and infallible: a source that cannot be read is
//! reported with its reason instead of failing `status`.

use std::collections::HashMap;

use serde::Serialize;

use super::source::{self, ScopeStatus};
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
    /// Hex digest of a scoped queue; null for `queue.db`.
    pub digest: Option<String>,
    pub scope_status: ScopeStatus,
    pub event_count: u64,
    /// Rows in `body_upload_queue` plus `body_upload_failure_log`.
    pub body_upload_count: u64,
    /// Migrated, and the file holds as many rows as were read then.
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

/// Describes the home's legacy queues. Cheap: row counts only, no payload is read.
pub fn legacy_queues_report(home: &Home, authority: &TargetAuthority, store: Option<&Store>) -> LegacyQueuesReport {
    let discovery = source::discover(home);
    let migrated = store.map(migrated_sources).unwrap_or_default();
    let mut report = LegacyQueuesReport::default();
    for file in &discovery.sources {
        let mut entry = LegacyQueueFile {
            path: file.display_path(),
            digest: file.digest.clone(),
            scope_status: file.scope_status(authority),
            event_count: 0,
            body_upload_count: 0,
            migrated: false,
            error: None,
        };
        match source::open(&file.path) {
            Ok(opened) => {
                entry.event_count = opened.queue_rows;
                entry.body_upload_count = opened.body_upload_rows();
                entry.migrated = migrated.get(&file.relative).is_some_and(|rows| *rows == opened.queue_rows);
                report.event_count += opened.queue_rows;
                report.body_upload.body_upload_queue_count += opened.body_upload_queue_rows;
                report.body_upload.body_upload_failure_log_count += opened.body_upload_failure_log_rows;
            }
            Err(reason) => entry.error = Some(reason),
        }
        report.files.push(entry);
    }
    if let Some((dir, reason)) = discovery.dir_error {
        report.files.push(LegacyQueueFile {
            path: dir.display().to_string(),
            digest: None,
            scope_status: ScopeStatus::Unknown,
            event_count: 0,
            body_upload_count: 0,
            migrated: false,
            error: Some(reason),
        });
    }
    report
}

/// `migrated_sources` as home-relative path → rows read. An unreadable table counts as empty:
/// `status` must not fail over a diagnostic.
fn migrated_sources(store: &Store) -> HashMap<String, u64> {
    let read = || -> rusqlite::Result<HashMap<String, u64>> {
        let mut stmt = store.conn().prepare("SELECT path, rows_read FROM migrated_sources")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?.max(0) as u64)))?;
        rows.collect()
    };
    read().unwrap_or_default()
}

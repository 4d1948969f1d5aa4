-- spec-kitty-cli 3.2.3's OfflineQueue schema, verbatim (reference anchor-data-model.md §2.1).
-- Shared by the migration tests and the migration benchmark.
CREATE TABLE IF NOT EXISTS queue (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT UNIQUE NOT NULL,
    event_type TEXT NOT NULL,
    data TEXT NOT NULL,
    timestamp INTEGER NOT NULL,
    retry_count INTEGER DEFAULT 0,
    coalesce_key TEXT
);
CREATE INDEX IF NOT EXISTS idx_timestamp ON queue(timestamp);
CREATE INDEX IF NOT EXISTS idx_retry ON queue(retry_count);
CREATE INDEX IF NOT EXISTS idx_coalesce_key ON queue(coalesce_key);

CREATE TABLE IF NOT EXISTS body_upload_queue (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    project_uuid TEXT NOT NULL,
    mission_slug TEXT NOT NULL,
    target_branch TEXT NOT NULL,
    mission_type TEXT NOT NULL,
    manifest_version TEXT NOT NULL,
    artifact_path TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    hash_algorithm TEXT NOT NULL DEFAULT 'sha256',
    content_body TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    retry_count INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0.0,
    created_at REAL NOT NULL,
    last_error TEXT,
    UNIQUE(project_uuid, mission_slug, target_branch, mission_type, manifest_version, artifact_path, content_hash)
);
CREATE INDEX IF NOT EXISTS idx_body_queue_next_attempt ON body_upload_queue(next_attempt_at);
CREATE INDEX IF NOT EXISTS idx_body_queue_namespace ON body_upload_queue(project_uuid, mission_slug, target_branch);

CREATE TABLE IF NOT EXISTS body_upload_failure_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    project_uuid TEXT NOT NULL,
    mission_slug TEXT NOT NULL,
    target_branch TEXT NOT NULL,
    mission_type TEXT NOT NULL,
    manifest_version TEXT NOT NULL,
    artifact_path TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    hash_algorithm TEXT NOT NULL DEFAULT 'sha256',
    size_bytes INTEGER NOT NULL,
    failure_reason TEXT NOT NULL,
    failure_count INTEGER NOT NULL DEFAULT 1,
    first_failed_at REAL NOT NULL,
    last_failed_at REAL NOT NULL,
    UNIQUE(project_uuid, mission_slug, target_branch, mission_type, manifest_version, artifact_path, content_hash, failure_reason)
);
CREATE INDEX IF NOT EXISTS idx_body_failure_last_failed_at ON body_upload_failure_log(last_failed_at DESC);

//! Numbered schema migrations, applied in order; `PRAGMA user_version` records the last one.
//! Never edit a released step: add a new one.

/// Step N (1-based) brings the store from version N-1 to N.
pub const MIGRATIONS: &[&str] = &[V1, V2_PYTHON_STORES, V3_TARGET_TYPES];

pub const LATEST_VERSION: i64 = MIGRATIONS.len() as i64;

/// Version 1: journal, payloads, targets, ledger with attempts, drop counters, migration
/// provenance and conflicts.
///
/// Why the payload lives in its own table: status counts, selection and gc scan event
/// metadata only; keeping the envelope bytes out of `events` keeps those scans to a few
/// dozen bytes per row at a million events.
const V1: &str = r#"
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;

-- One row per captured event, in capture order (seq). Never deleted.
-- state: 0 retained, 1 archived (payload kept), 2 purged (payload removed by gc).
CREATE TABLE events (
    seq                  INTEGER PRIMARY KEY,
    event_id             TEXT NOT NULL UNIQUE,
    event_type           TEXT NOT NULL,
    state                INTEGER NOT NULL DEFAULT 0,
    payload_bytes        INTEGER NOT NULL,
    captured_at          INTEGER NOT NULL,
    payload_sha256       BLOB NOT NULL,
    capture_team         TEXT,
    drain_blocked_reason TEXT,
    coalesce_key         TEXT,
    coalesced_into       TEXT,
    archived_at          INTEGER,
    purged_at            INTEGER,
    -- Targets that terminally received the event in their current epoch (trigger-maintained).
    delivered_targets    INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX events_by_state ON events (state, captured_at, payload_bytes);
CREATE INDEX events_by_coalesce_key ON events (coalesce_key, seq)
    WHERE coalesce_key IS NOT NULL AND coalesced_into IS NULL;
-- Retained events blocked at capture that no target has received yet (and that were not
-- coalesced away: those are never delivered, blocked or not).
CREATE INDEX events_by_blocked_reason ON events (drain_blocked_reason)
    WHERE drain_blocked_reason IS NOT NULL AND state = 0 AND delivered_targets = 0 AND coalesced_into IS NULL;
CREATE INDEX events_by_capture_team ON events (capture_team, state) WHERE capture_team IS NOT NULL;

-- The stored envelope bytes, exactly as captured. Only gc deletes a row here.
CREATE TABLE payloads (
    seq      INTEGER PRIMARY KEY,
    envelope BLOB NOT NULL
);

-- Events dropped by an explicit opt-out rule, counted per type.
CREATE TABLE dropped_events (
    event_type TEXT PRIMARY KEY,
    count      INTEGER NOT NULL
) WITHOUT ROWID;

-- Delivery targets. Identity = (canonical_url, team_slug, user_email); deployment metadata
-- is provenance only. epoch increases when the operator re-drains a reset target; ledger
-- rows of older epochs are history. due_from_seq: every event with a smaller seq is settled
-- for the current epoch (a high-water mark that lets a no-op drain skip the whole journal).
CREATE TABLE targets (
    id                 INTEGER PRIMARY KEY,
    target_id          TEXT NOT NULL UNIQUE,
    kind               TEXT NOT NULL,
    canonical_url      TEXT NOT NULL,
    team_slug          TEXT NOT NULL DEFAULT '',
    user_email         TEXT NOT NULL DEFAULT '',
    server_instance_id TEXT,
    deployment_id      TEXT,
    environment_name   TEXT,
    git_sha            TEXT,
    first_seen_at      INTEGER NOT NULL,
    last_seen_at       INTEGER NOT NULL,
    epoch              INTEGER NOT NULL DEFAULT 0,
    due_from_seq       INTEGER NOT NULL DEFAULT 0,
    reset_detected     TEXT,
    UNIQUE (canonical_url, team_slug, user_email)
);

-- Per event x target x epoch delivery state.
CREATE TABLE ledger (
    target             INTEGER NOT NULL,
    epoch              INTEGER NOT NULL,
    seq                INTEGER NOT NULL,
    status             TEXT NOT NULL,
    attempt_count      INTEGER NOT NULL DEFAULT 0,
    reject_count       INTEGER NOT NULL DEFAULT 0,
    first_attempted_at INTEGER,
    last_attempted_at  INTEGER,
    completed_at       INTEGER,
    last_http_status   INTEGER,
    last_error         TEXT,
    PRIMARY KEY (target, epoch, seq)
) WITHOUT ROWID;
CREATE INDEX ledger_by_event ON ledger (seq, status);
CREATE INDEX ledger_by_status ON ledger (target, epoch, status);

-- Every attempt, kept forever.
CREATE TABLE attempts (
    id          INTEGER PRIMARY KEY,
    target      INTEGER NOT NULL,
    epoch       INTEGER NOT NULL,
    seq         INTEGER NOT NULL,
    at          INTEGER NOT NULL,
    outcome     TEXT NOT NULL,
    http_status INTEGER,
    error       TEXT
);
CREATE INDEX attempts_by_event ON attempts (seq, target, id);

-- Legacy migration: where each event came from, and content that disagreed.
CREATE TABLE migration_provenance (
    seq            INTEGER NOT NULL,
    source         TEXT NOT NULL,
    source_path    TEXT NOT NULL,
    payload_sha256 TEXT NOT NULL,
    recorded_at    INTEGER NOT NULL,
    PRIMARY KEY (seq, source)
) WITHOUT ROWID;

CREATE TABLE migration_conflicts (
    id                INTEGER PRIMARY KEY,
    event_id          TEXT NOT NULL,
    source            TEXT NOT NULL,
    source_path       TEXT NOT NULL,
    existing_sha256   TEXT NOT NULL,
    incoming_sha256   TEXT NOT NULL,
    incoming_envelope BLOB NOT NULL,
    detected_at       INTEGER NOT NULL,
    resolved_at       INTEGER,
    resolution        TEXT,
    UNIQUE (event_id, source)
);

-- Counters that status reads in O(1), kept exact by the triggers below inside the same
-- transactions as the rows they count (aggregating a million rows would take seconds).
CREATE TABLE stats (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
INSERT INTO stats (key) VALUES ('retained'), ('retained_bytes'), ('archived'), ('purged'), ('coalesced'),
    ('delivered_any');

-- Per target and epoch: ledger rows by status, and 'exclusive' = events whose only terminal
-- delivery is to this target (so "delivered to another target" = delivered_any - exclusive).
CREATE TABLE target_stats (
    target INTEGER NOT NULL,
    epoch  INTEGER NOT NULL,
    key    TEXT NOT NULL,
    value  INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (target, epoch, key)
) WITHOUT ROWID;

CREATE TRIGGER targets_stats_rows AFTER INSERT ON targets BEGIN
    INSERT INTO target_stats (target, epoch, key)
    SELECT NEW.id, NEW.epoch, k.column1 FROM (VALUES ('success'), ('duplicate'), ('pending'), ('failed_transient'),
        ('rejected'), ('terminal_failed'), ('exclusive')) AS k;
END;
CREATE TRIGGER targets_epoch_stats_rows AFTER UPDATE OF epoch ON targets WHEN NEW.epoch <> OLD.epoch BEGIN
    INSERT OR IGNORE INTO target_stats (target, epoch, key)
    SELECT NEW.id, NEW.epoch, k.column1 FROM (VALUES ('success'), ('duplicate'), ('pending'), ('failed_transient'),
        ('rejected'), ('terminal_failed'), ('exclusive')) AS k;
END;

-- Two single-key updates: a `key IN (...)` form builds a temporary index on every insert.
CREATE TRIGGER events_counted AFTER INSERT ON events BEGIN
    UPDATE stats SET value = value + 1 WHERE key = 'retained';
    UPDATE stats SET value = value + NEW.payload_bytes WHERE key = 'retained_bytes';
END;
CREATE TRIGGER events_resized AFTER UPDATE OF payload_bytes ON events
WHEN NEW.payload_bytes <> OLD.payload_bytes AND NEW.state = 0 BEGIN
    UPDATE stats SET value = value + NEW.payload_bytes - OLD.payload_bytes WHERE key = 'retained_bytes';
END;
-- A purge by gc (state 2 set while purged_at goes from NULL to set) is counted by gc itself, once per batch
-- (delivery::retention::purge_range): per row, this trigger was most of gc's time.
CREATE TRIGGER events_state_changed AFTER UPDATE OF state ON events
WHEN NEW.state <> OLD.state AND NOT (NEW.state = 2 AND OLD.purged_at IS NULL AND NEW.purged_at IS NOT NULL) BEGIN
    UPDATE stats SET value = value
        + (CASE WHEN key = 'retained' AND NEW.state = 0 THEN 1 WHEN key = 'retained' AND OLD.state = 0 THEN -1 ELSE 0 END)
        + (CASE WHEN key = 'archived' AND NEW.state = 1 THEN 1 WHEN key = 'archived' AND OLD.state = 1 THEN -1 ELSE 0 END)
        + (CASE WHEN key = 'purged' AND NEW.state = 2 THEN 1 WHEN key = 'purged' AND OLD.state = 2 THEN -1 ELSE 0 END)
        + (CASE WHEN key = 'retained_bytes' AND NEW.state = 0 THEN NEW.payload_bytes
                WHEN key = 'retained_bytes' AND OLD.state = 0 THEN -OLD.payload_bytes ELSE 0 END)
    WHERE key IN ('retained', 'archived', 'purged', 'retained_bytes');
END;
CREATE TRIGGER events_coalesced AFTER UPDATE OF coalesced_into ON events
WHEN (NEW.coalesced_into IS NULL) <> (OLD.coalesced_into IS NULL) BEGIN
    UPDATE stats SET value = value + CASE WHEN NEW.coalesced_into IS NULL THEN -1 ELSE 1 END WHERE key = 'coalesced';
END;

CREATE TRIGGER ledger_counted AFTER INSERT ON ledger BEGIN
    UPDATE target_stats SET value = value + 1 WHERE target = NEW.target AND epoch = NEW.epoch AND key = NEW.status;
END;
CREATE TRIGGER ledger_recounted AFTER UPDATE OF status ON ledger WHEN NEW.status <> OLD.status BEGIN
    UPDATE target_stats SET value = value + CASE key WHEN NEW.status THEN 1 ELSE -1 END
    WHERE target = NEW.target AND epoch = NEW.epoch AND key IN (NEW.status, OLD.status);
END;
-- A first terminal delivery for (event, target) is counted per batch by
-- store::stats::note_delivered (set-based: one statement group per batch instead of four
-- statements per row), in the same transaction as the ledger rows.

CREATE TABLE migrated_sources (
    path        TEXT PRIMARY KEY,
    digest      TEXT NOT NULL,
    migrated_at INTEGER NOT NULL,
    rows_read   INTEGER NOT NULL
) WITHOUT ROWID;
"#;

/// Version 2: importing spec-kitty 3.2.4–3.2.7's Python stores (contract §12).
///
/// - `migrated_sources.kind` / `fingerprint` / `summary`: a Python store is skipped by a re-run
///   while its files are unchanged (size and modification time of the file and its sidecars),
///   so a re-run over 100,000 events costs a `stat`, not a re-read; `summary` keeps that
///   import's counts for the report.
/// - `migration_aliases`: a Python journal row whose key differs from its envelope's
///   `event_id` is journaled under the envelope's id; its row key stays resolvable for the
///   ledger rows Python recorded under it, and for the report's `id_mismatches`.
/// - `consent_releases`: events the operator released with `retry --not-consented`, so a later
///   import of the same project store never holds them back again.
const V2_PYTHON_STORES: &str = r#"
ALTER TABLE migrated_sources ADD COLUMN kind TEXT NOT NULL DEFAULT 'legacy_queue';
ALTER TABLE migrated_sources ADD COLUMN fingerprint TEXT;
ALTER TABLE migrated_sources ADD COLUMN summary TEXT;

CREATE TABLE migration_aliases (
    alias  TEXT NOT NULL,
    source TEXT NOT NULL,
    seq    INTEGER NOT NULL,
    PRIMARY KEY (alias, source)
) WITHOUT ROWID;

CREATE TABLE consent_releases (
    seq         INTEGER PRIMARY KEY,
    released_at INTEGER NOT NULL
);
"#;

/// Version 3: a named target's type filter (contract §9) as last delivered with, a JSON
/// array or NULL for every type. `gc`/`archive` narrow "every known target" by it, also for
/// targets no longer configured; a changed filter moves the target's high-water mark back
/// to the start, since events of newly included types below it were never sent.
const V3_TARGET_TYPES: &str = r#"
ALTER TABLE targets ADD COLUMN types TEXT;
"#;

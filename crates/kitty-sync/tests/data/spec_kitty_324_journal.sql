-- spec-kitty-cli 3.2.4's Python stores, verbatim from files it wrote (sqlite3 .schema):
-- event_journal/journal-<token>.db
CREATE TABLE event_journal (
    event_id TEXT PRIMARY KEY,
    event_type TEXT NOT NULL,
    payload BLOB NOT NULL,
    occurred_at TEXT NOT NULL,
    created_at TEXT NOT NULL,
    coalesce_key TEXT,
    archived_at TEXT,
    drain_blocked_reason TEXT
);
CREATE INDEX idx_event_journal_coalesce ON event_journal (coalesce_key, created_at);
CREATE INDEX idx_event_journal_type_created ON event_journal (event_type, created_at);

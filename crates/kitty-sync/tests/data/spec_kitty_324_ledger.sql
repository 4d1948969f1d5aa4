-- spec-kitty-cli 3.2.4's delivery/ledger.db, verbatim (sqlite3 .schema)
CREATE TABLE delivery_ledger (
    event_id            TEXT NOT NULL,
    target_id           TEXT NOT NULL,
    status              TEXT NOT NULL,
    attempt_count       INTEGER NOT NULL DEFAULT 0,
    first_attempted_at  TEXT,
    last_attempted_at   TEXT,
    accepted_at         TEXT,
    completed_at        TEXT,
    server_drain_state  TEXT,
    last_http_status    INTEGER,
    last_error          TEXT,
    last_response_json  TEXT,
    PRIMARY KEY (event_id, target_id)
);
CREATE INDEX idx_delivery_ledger_target_status
    ON delivery_ledger (target_id, status);

-- spec-kitty-cli 3.2.4's delivery/targets.db, verbatim (sqlite3 .schema)
CREATE TABLE delivery_targets (
    target_id          TEXT PRIMARY KEY,
    canonical_url      TEXT NOT NULL,
    url_hash           TEXT NOT NULL,
    team_slug          TEXT NOT NULL,
    user_email         TEXT NOT NULL,
    server_instance_id TEXT,
    deployment_id      TEXT,
    environment_name   TEXT,
    git_sha            TEXT,
    first_seen_at      TEXT NOT NULL,
    last_seen_at       TEXT NOT NULL,
    UNIQUE(url_hash, team_slug, user_email)
);

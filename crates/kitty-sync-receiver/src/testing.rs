//! Helpers for tests and benchmarks that need a real PostgreSQL (this crate's, the CLI's):
//! where the test server is, and a throwaway schema per test. Not part of the receiver.

use std::io::Write;
use std::sync::Once;
use std::sync::atomic::{AtomicU32, Ordering};

/// The variable that names the test server; `scripts/pg-test-cluster` sets it.
pub const PG_URL_VAR: &str = "KITTY_SYNC_TEST_PG_URL";

/// The test server's URL. Without one, a CI run (`CI=true`) fails here, since PostgreSQL
/// tests must never silently skip there; elsewhere the caller skips after a loud message.
pub fn test_pg_url() -> Option<String> {
    match std::env::var(PG_URL_VAR) {
        Ok(url) if !url.trim().is_empty() => Some(url.trim().to_string()),
        _ if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") => {
            panic!("{PG_URL_VAR} is not set in CI: run the tests through scripts/pg-test-cluster run ...")
        }
        _ => {
            static WARNED: Once = Once::new();
            WARNED.call_once(|| {
                // Straight to stderr: the test harness would swallow eprintln! of a passing test.
                let _ = writeln!(
                    std::io::stderr(),
                    "\n*** SKIPPING PostgreSQL tests: {PG_URL_VAR} is not set. Start a throwaway server with \
                     `scripts/pg-test-cluster run cargo test ...` (or `eval \"$(scripts/pg-test-cluster start)\"`). ***\n"
                );
            });
            None
        }
    }
}

/// A schema of its own in the test database, dropped again on drop. [`PgScratch::url`]
/// points `search_path` at it, so the receiver's unqualified tables land there.
pub struct PgScratch {
    admin_url: String,
    schema: String,
}

impl PgScratch {
    /// `None` when there is no test server (see [`test_pg_url`]).
    pub fn new() -> Option<PgScratch> {
        let admin_url = test_pg_url()?;
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let schema = format!("t_{}_{}_{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed), nanos());
        let scratch = PgScratch { admin_url, schema };
        scratch.sql(&format!("CREATE SCHEMA {}", scratch.schema));
        Some(scratch)
    }

    /// The receiver's `--store` URL for this schema.
    pub fn url(&self) -> String {
        let separator = if self.admin_url.contains('?') { '&' } else { '?' };
        format!("{}{separator}options=-csearch_path%3D{}", self.admin_url, self.schema)
    }

    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// Drops the schema with everything in it and creates it empty again: a wiped receiver.
    pub fn wipe(&self) {
        self.sql(&format!("DROP SCHEMA {0} CASCADE; CREATE SCHEMA {0}", self.schema));
    }

    /// Runs `sql` (one or more statements) in this schema; panics on failure.
    pub fn sql(&self, sql: &str) {
        simple_query(&self.admin_url, &format!("SET search_path TO {}; {sql}", self.schema))
            .unwrap_or_else(|e| panic!("test SQL failed: {e}: {sql}"));
    }

    /// The first column of every row of `query` (run in this schema), as text.
    pub fn query_column(&self, query: &str) -> Vec<String> {
        simple_query(&self.url(), query)
            .unwrap_or_else(|e| panic!("test query failed: {e}: {query}"))
            .into_iter()
            .filter_map(|message| match message {
                tokio_postgres::SimpleQueryMessage::Row(row) => Some(row.get(0).unwrap_or("").to_string()),
                _ => None,
            })
            .collect()
    }
}

impl Drop for PgScratch {
    fn drop(&mut self) {
        // Best effort: a failed test must not fail twice.
        let _ = simple_query(&self.admin_url, &format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema));
    }
}

/// One connection, one simple-protocol query (several statements allowed), closed again.
fn simple_query(url: &str, sql: &str) -> Result<Vec<tokio_postgres::SimpleQueryMessage>, tokio_postgres::Error> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("cannot start a runtime: {e}"));
    runtime.block_on(async {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        let driver = tokio::spawn(connection);
        let result = client.simple_query(sql).await;
        drop(client);
        let _ = driver.await;
        result
    })
}

fn nanos() -> u32 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos())
}

//! `kitty-sync receiver serve|dump`: the built-in batch-protocol receiver (on SQLite or
//! PostgreSQL) and a read-only view of its database.

use std::io::{self, BufWriter, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::num::NonZeroU64;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kitty_sync::Error;
use kitty_sync_receiver::config::{DEFAULT_SHUTDOWN_GRACE, Deployment, Faults};
use kitty_sync_receiver::{
    AnyStore, BearerToken, PgStore, ServeError, Server, ServerConfig, SqliteStore, StoreError, StoreLocation,
    StoreStats, StoredEvent,
};

#[derive(clap::Subcommand, Debug)]
pub enum ReceiverCommand {
    /// Run the built-in receiver: a batch-protocol HTTP server that stores events in SQLite or
    /// PostgreSQL
    Serve(Box<ServeArgs>),
    /// List what a receiver database holds (opened read-only; never created or changed)
    Dump(DumpArgs),
}

const SERVE_AFTER_HELP: &str = "\
Endpoints:
  POST /api/v1/events/batch/   {\"events\":[...]}, gzip or identity; per-event success / duplicate / rejected
  GET  /api/v1/sync/health/    status, server_instance_id (born with the database), deployment fields
  GET  /api/v1/events/?after=SEQ&limit=N
                               stored events by seq; limit defaults to 100, at most 1000;
                               next_after is the last seq returned, or `after` when the page is empty
With --token-env, batch and listing requests need `Authorization: Bearer <token>`; health stays open.
The first stdout line is `listening on http://HOST:PORT`. SIGINT/SIGTERM stop it gracefully.

Stores (--store):
  sqlite:PATH                  one file, one operator (the default: sqlite:./receiver.db; --db PATH is short for it)
  postgres://USER[:PASSWORD]@HOST[:PORT]/DB   (postgresql:// too)
                               any number of replicas may share one database: each event_id is stored once,
                               the listing never skips, server_instance_id belongs to the database.
                               PGPASSWORD is used when the URL has no password. No TLS: sslmode=disable or
                               prefer (plain), require/verify-* are refused. Tables go into the first schema
                               of search_path (add ?options=-csearch_path%3DNAME to choose one).";

/// `--store` and its short form `--db`, shared by `serve` and `dump`.
#[derive(clap::Args, Debug)]
pub struct StoreArgs {
    /// Where events are stored: sqlite:PATH or postgres://USER[:PASSWORD]@HOST[:PORT]/DB
    /// [default: sqlite:./receiver.db]
    #[arg(long, value_name = "URL", conflicts_with = "db")]
    pub store: Option<String>,
    /// Short for --store sqlite:PATH
    #[arg(long, value_name = "PATH")]
    pub db: Option<PathBuf>,
}

impl StoreArgs {
    fn location(&self) -> Result<StoreLocation, Error> {
        if let Some(db) = &self.db {
            return Ok(StoreLocation::Sqlite(db.clone()));
        }
        let Some(text) = &self.store else { return Ok(StoreLocation::Sqlite(PathBuf::from("./receiver.db"))) };
        let password = std::env::var("PGPASSWORD").ok();
        StoreLocation::parse(text, password.as_deref()).map_err(|e| Error::usage(e.message, e.hint))
    }
}

#[derive(clap::Args, Debug)]
#[command(after_help = SERVE_AFTER_HELP)]
pub struct ServeArgs {
    /// Address to listen on: HOST:PORT (port 0 picks a free port; ":PORT" means 127.0.0.1:PORT)
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8787")]
    pub bind: String,
    #[command(flatten)]
    pub store: StoreArgs,
    /// PostgreSQL connections this replica keeps at most
    #[arg(long, value_name = "N", default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub pg_pool: u16,
    /// Require a bearer token, read from this environment variable at startup
    #[arg(long, value_name = "VAR")]
    pub token_env: Option<String>,
    /// Largest request body, after decompression; larger bodies get 413 (bytes, or with
    /// a KiB/MiB/GiB suffix)
    #[arg(long, value_name = "N", default_value = "8MiB", value_parser = parse_size)]
    pub max_body_bytes: usize,
    /// Largest event, as serialized in the request: alone in a batch it gets 413, among
    /// others it is rejected "oversized" (bytes, or with a KiB/MiB/GiB suffix)
    #[arg(long, value_name = "N", default_value = "1MiB", value_parser = parse_size)]
    pub max_event_bytes: usize,
    /// deployment_id reported by the health endpoint (null when unset)
    #[arg(long, value_name = "S")]
    pub deployment_id: Option<String>,
    /// environment_name reported by the health endpoint (null when unset)
    #[arg(long, value_name = "S")]
    pub environment_name: Option<String>,
    /// git_sha reported by the health endpoint (null when unset)
    #[arg(long, value_name = "S")]
    pub git_sha: Option<String>,
    /// Testing: batch requests N, 2N, 3N, ... (counted from 1, after authentication) are
    /// answered --fail-status and store nothing
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub fail_every: Option<u64>,
    /// Testing: status of injected failures; 429 and 503 carry `Retry-After: 1`
    #[arg(long, value_name = "CODE", default_value_t = 503,
          value_parser = clap::value_parser!(u16).range(400..=599))]
    pub fail_status: u16,
    /// Testing: answer events of this event_type `rejected` (repeatable)
    #[arg(long = "reject-type", value_name = "TYPE")]
    pub reject_types: Vec<String>,
    /// Testing: wait this many milliseconds before every response (after the batch is committed)
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub delay_ms: u64,
    #[command(flatten)]
    pub connections: ConnectionArgs,
}

#[derive(clap::Args, Debug)]
pub struct DumpArgs {
    #[command(flatten)]
    pub store: StoreArgs,
}

pub fn run(cmd: ReceiverCommand, json: bool) -> anyhow::Result<()> {
    match cmd {
        ReceiverCommand::Serve(args) => serve(*args),
        ReceiverCommand::Dump(args) => dump(&args, json),
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let addr = resolve_bind(&args.bind)?;
    let token = args.token_env.as_deref().map(read_token).transpose()?;
    if token.is_none() && !addr.ip().is_loopback() {
        eprintln!("warning: listening on {addr} without --token-env: anyone who can reach it can post events");
    }
    let config = server_config(&args, token);
    let location = args.store.location()?;
    let store = open_store(&location, args.pg_pool)?;
    let server = Server::bind(addr, config, store).map_err(serve_error)?;
    match server.run_until_signal(|addr| announce(addr, &location)) {
        Ok(()) => Ok(()),
        // The signal was honoured and the database closed; only stragglers were cut off.
        Err(ServeError::ShutdownTimedOut(grace)) => {
            eprintln!("warning: stopped with requests still in flight after waiting {grace:?}");
            Ok(())
        }
        Err(e) => Err(serve_error(e).into()),
    }
}

fn server_config(args: &ServeArgs, token: Option<BearerToken>) -> ServerConfig {
    ServerConfig {
        max_body_bytes: args.max_body_bytes,
        max_event_bytes: args.max_event_bytes,
        token,
        deployment: Deployment {
            deployment_id: args.deployment_id.clone(),
            environment_name: args.environment_name.clone(),
            git_sha: args.git_sha.clone(),
        },
        faults: Faults {
            fail_every: args.fail_every.and_then(NonZeroU64::new),
            fail_status: args.fail_status,
            reject_types: args.reject_types.iter().cloned().collect(),
            delay: Duration::from_millis(args.delay_ms),
        },
        shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
        connections: args.connections.limits(),
    }
}

/// Opens (creating or migrating when needed) the store `serve` writes to.
fn open_store(location: &StoreLocation, pg_pool: u16) -> Result<AnyStore, Error> {
    let opened = match location {
        StoreLocation::Sqlite(path) => SqliteStore::open(path).map(AnyStore::from),
        StoreLocation::Postgres(pg) => PgStore::open(pg, usize::from(pg_pool)).map(AnyStore::from),
    };
    opened.map_err(|e| store_error(e, location))
}

/// The first stdout line, flushed at once: scripts and tests wait for it. The store follows,
/// its password (if any) shown as `***`.
fn announce(addr: SocketAddr, location: &StoreLocation) {
    let mut stdout = io::stdout().lock();
    // A closed stdout must not stop the server.
    let _ = writeln!(stdout, "listening on http://{addr}");
    let _ = writeln!(stdout, "store {location}");
    let _ = stdout.flush();
}

fn resolve_bind(text: &str) -> Result<SocketAddr, Error> {
    let trimmed = text.trim();
    let spec = if trimmed.starts_with(':') { format!("127.0.0.1{trimmed}") } else { trimmed.to_string() };
    let hint = "use HOST:PORT, e.g. --bind 127.0.0.1:8787, or --bind 127.0.0.1:0 for a free port";
    if let Ok(addr) = spec.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let addrs: Vec<SocketAddr> = spec
        .to_socket_addrs()
        .map_err(|e| Error::usage(format!("invalid --bind address {text:?}: {e}"), hint))?
        .collect();
    // Prefer IPv4 so that `localhost:PORT` is reachable as 127.0.0.1 too.
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| Error::usage(format!("--bind address {text:?} resolves to nothing"), hint))
}

fn read_token(var: &str) -> Result<BearerToken, Error> {
    let hint = format!(
        "export {var}=<token> before starting the receiver, or drop --token-env to accept requests without a token"
    );
    match std::env::var(var) {
        Ok(value) if !value.trim().is_empty() => Ok(BearerToken::new(value.trim())),
        Ok(_) => Err(Error::usage(format!("environment variable {var} (--token-env) is empty"), hint)),
        Err(std::env::VarError::NotPresent) => {
            Err(Error::usage(format!("environment variable {var} (--token-env) is not set"), hint))
        }
        Err(std::env::VarError::NotUnicode(_)) => {
            Err(Error::usage(format!("environment variable {var} (--token-env) is not valid UTF-8"), hint))
        }
    }
}

/// `N`, `NKiB`, `NMiB` or `NGiB` (case-insensitive), at least 1 byte.
fn parse_size(text: &str) -> Result<usize, String> {
    let lower = text.trim().to_ascii_lowercase();
    let (digits, unit) = match lower.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => lower.split_at(at),
        None => (lower.as_str(), ""),
    };
    let multiplier: usize = match unit.trim() {
        "" | "b" => 1,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        other => return Err(format!("unknown unit {other:?}: use bytes, KiB, MiB or GiB")),
    };
    let number: usize = digits.parse().map_err(|_| format!("{text:?} is not a size, e.g. 8MiB"))?;
    match number.checked_mul(multiplier) {
        Some(0) => Err("the size must be at least 1 byte".to_string()),
        Some(bytes) => Ok(bytes),
        None => Err(format!("{text:?} is too large")),
    }
}

fn store_error(error: StoreError, location: &StoreLocation) -> Error {
    let message = error.to_string();
    let retry = "check that the database is reachable and its disk has space, then try again";
    match error {
        StoreError::Missing { .. } => Error::usage(
            message,
            "pass the --db path the receiver was started with (`kitty-sync receiver serve --db PATH`)",
        ),
        StoreError::MissingDirectory { .. } => {
            Error::usage(message, "create the directory first, or choose another --db path")
        }
        StoreError::NotAReceiverDatabase { .. } => Error::usage(
            message,
            "point --db at a receiver database or at a new file; the receiver never writes to other files",
        ),
        StoreError::NoSchema { .. } => Error::usage(
            message,
            "pass the --store URL the receiver was started with; `receiver serve --store URL` creates the schema",
        ),
        StoreError::NewerSchema { .. } => Error::usage(
            message,
            "use the kitty-sync version that created this database (or a newer one), or point --store at another",
        ),
        StoreError::Unreachable { .. } => Error::internal(
            message,
            format!(
                "check that PostgreSQL is running and accepts connections at {location}, and the user, password \
                 (or PGPASSWORD) and database name"
            ),
        ),
        StoreError::Busy { .. } if matches!(location, StoreLocation::Postgres(_)) => Error::internal(message, retry),
        StoreError::Busy { .. } => {
            Error::internal(message, "another process holds the receiver database locked; stop it or try again")
        }
        StoreError::ReadOnly | StoreError::Backend { .. } | StoreError::TooManyEvents { .. } => match location {
            StoreLocation::Postgres(_) => Error::internal(message, retry),
            StoreLocation::Sqlite(db) => Error::internal(
                message,
                format!(
                    "check that {} is a readable, writable receiver database and that the disk has space",
                    db.display()
                ),
            ),
        },
    }
}

fn serve_error(error: ServeError) -> Error {
    let ServeError::Bind { addr, source } = &error else {
        return Error::internal(
            error.to_string(),
            "this is unexpected; run the command again, and report it if it persists",
        );
    };
    match source.kind() {
        io::ErrorKind::AddrInUse => Error::internal(
            format!("cannot listen on {addr}: address already in use"),
            "stop the process using that port, or choose another with --bind (port 0 picks a free one)",
        ),
        io::ErrorKind::PermissionDenied => Error::internal(
            format!("cannot listen on {addr}: permission denied"),
            "ports below 1024 need privileges; choose a higher port with --bind",
        ),
        io::ErrorKind::AddrNotAvailable => Error::usage(
            format!("cannot listen on {addr}: not an address of this machine"),
            "use 127.0.0.1, 0.0.0.0, or an address of one of this machine's interfaces",
        ),
        _ => Error::internal(error.to_string(), "check the --bind address and try again"),
    }
}

/// A store opened for reading, with a runtime to drive it from this synchronous command.
struct DumpSource {
    runtime: tokio::runtime::Runtime,
    store: AnyStore,
    instance_id: String,
}

impl DumpSource {
    fn open(location: &StoreLocation) -> Result<DumpSource, StoreError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::Backend { context: "cannot start the database runtime", source: Box::new(e) })?;
        let store = match location {
            StoreLocation::Sqlite(path) => AnyStore::from(SqliteStore::open_read_only(path)?),
            StoreLocation::Postgres(pg) => AnyStore::from(runtime.block_on(PgStore::connect_read_only(pg))?),
        };
        let instance_id = runtime.block_on(store.server_instance_id())?;
        Ok(DumpSource { runtime, store, instance_id })
    }

    fn stats(&self) -> Result<StoreStats, StoreError> {
        self.runtime.block_on(self.store.stats())
    }

    fn events_after(&self, after: i64, limit: usize) -> Result<Vec<StoredEvent>, StoreError> {
        self.runtime.block_on(self.store.events_after(after, limit))
    }
}

fn dump(args: &DumpArgs, json: bool) -> anyhow::Result<()> {
    let location = args.store.location()?;
    let source = DumpSource::open(&location).map_err(|e| store_error(e, &location))?;
    let stats = source.stats().map_err(|e| store_error(e, &location))?;
    let mut out = BufWriter::new(io::stdout().lock());
    let written =
        if json { write_json(&source, &stats, &mut out) } else { write_human(&source, &stats, &location, &mut out) };
    match written.and_then(|()| out.flush().map_err(DumpError::Io)) {
        Ok(()) => Ok(()),
        // `dump | head` is a normal way to look at a large database.
        Err(DumpError::Io(e)) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        Err(DumpError::Io(e)) => Err(Error::io("write", Path::new("<stdout>"), e).into()),
        Err(DumpError::Store(e)) => Err(store_error(e, &location).into()),
    }
}

enum DumpError {
    Io(io::Error),
    Store(StoreError),
}

impl From<io::Error> for DumpError {
    fn from(error: io::Error) -> Self {
        DumpError::Io(error)
    }
}

/// Pages through the events of the `stats` snapshot, so the list matches the counts even
/// while a server is still writing.
fn for_each_event(
    source: &DumpSource,
    stats: &StoreStats,
    mut visit: impl FnMut(&StoredEvent) -> Result<(), DumpError>,
) -> Result<(), DumpError> {
    let mut after = 0;
    while after < stats.last_seq {
        let page = source.events_after(after, 1000).map_err(DumpError::Store)?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        for event in page.iter().filter(|e| e.seq <= stats.last_seq) {
            visit(event)?;
        }
    }
    Ok(())
}

/// One JSON document, streamed: a large database is never held in memory.
fn write_json(source: &DumpSource, stats: &StoreStats, out: &mut impl Write) -> Result<(), DumpError> {
    let by_status: serde_json::Map<String, serde_json::Value> =
        stats.batch_requests_by_status.iter().map(|(status, count)| (status.to_string(), (*count).into())).collect();
    write!(
        out,
        "{{\"server_instance_id\":{},\"event_count\":{},\"batch_requests\":{},\"batch_requests_by_status\":{},\"events\":[",
        serde_json::Value::from(source.instance_id.as_str()),
        stats.event_count,
        stats.batch_requests,
        serde_json::Value::Object(by_status),
    )?;
    let mut first = true;
    for_each_event(source, stats, |event| {
        if !first {
            out.write_all(b",")?;
        }
        first = false;
        serde_json::to_writer(&mut *out, event).map_err(io::Error::from)?;
        Ok(())
    })?;
    out.write_all(b"]}\n")?;
    Ok(())
}

fn write_human(
    source: &DumpSource,
    stats: &StoreStats,
    location: &StoreLocation,
    out: &mut impl Write,
) -> Result<(), DumpError> {
    let by_status: Vec<String> = stats.batch_requests_by_status.iter().map(|(s, n)| format!("{s}: {n}")).collect();
    match location {
        StoreLocation::Sqlite(db) => writeln!(out, "receiver database  {}", db.display())?,
        StoreLocation::Postgres(_) => writeln!(out, "receiver database  {location}")?,
    }
    writeln!(out, "server instance    {}", source.instance_id)?;
    writeln!(out, "events             {}", stats.event_count)?;
    if by_status.is_empty() {
        writeln!(out, "batch requests     0")?;
    } else {
        writeln!(out, "batch requests     {} ({})", stats.batch_requests, by_status.join(", "))?;
    }
    if stats.event_count == 0 {
        return Ok(());
    }
    writeln!(out)?;
    writeln!(out, "{:>8}  {:<26}  {:<32}  RECEIVED AT", "SEQ", "EVENT ID", "EVENT TYPE")?;
    for_each_event(source, stats, |e| {
        writeln!(out, "{:>8}  {:<26}  {:<32}  {}", e.seq, e.event_id, e.event_type, e.received_at)?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("8MiB"), Ok(8 * 1024 * 1024));
        assert_eq!(parse_size("512kib"), Ok(512 * 1024));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert!(parse_size("0").is_err());
        assert!(parse_size("8MB").is_err());
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("-1").is_err());
    }

    #[test]
    fn bind_addresses() {
        assert_eq!(resolve_bind("127.0.0.1:0").unwrap().port(), 0);
        assert_eq!(resolve_bind(":9000").unwrap(), "127.0.0.1:9000".parse().unwrap());
        assert!(resolve_bind("localhost:0").unwrap().ip().is_loopback());
        let error = resolve_bind("nonsense").unwrap_err();
        assert_eq!(error.exit_code(), 2);
        assert!(error.hint().contains("127.0.0.1:0"));
    }

    #[test]
    fn missing_token_variable_is_a_usage_error() {
        let error = read_token("KITTY_SYNC_RECEIVER_TEST_SURELY_UNSET").unwrap_err();
        assert_eq!(error.exit_code(), 2);
        assert!(error.hint().contains("export KITTY_SYNC_RECEIVER_TEST_SURELY_UNSET="));
    }
}

/// Bounds on abusive or broken clients: slow headers, slow or endless bodies, idle floods.
#[derive(clap::Args, Debug)]
pub struct ConnectionArgs {
    /// Open connections at most; past it the longest-idle one (or the one stuck longest
    /// sending its body) is closed to make room
    #[arg(long, value_name = "N", default_value_t = kitty_sync_receiver::config::DEFAULT_MAX_CONNECTIONS as u64,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_connections: u64,
    /// Seconds a connection has to send a complete request head, from its opening or from
    /// its previous answer (also closes idle keep-alive connections)
    #[arg(long, value_name = "SECS", default_value_t = kitty_sync_receiver::config::DEFAULT_HEADER_TIMEOUT.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub header_timeout: u64,
    /// Longest pause, in seconds, while a request body arrives; after it a too slow body is
    /// answered 408
    #[arg(long, value_name = "SECS", default_value_t = kitty_sync_receiver::config::DEFAULT_BODY_TIMEOUT.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub body_timeout: u64,
    /// Slowest average rate (bytes per second) a body may arrive at once --body-timeout has
    /// passed; 0 turns the rate check off
    #[arg(long, value_name = "BYTES", default_value_t = kitty_sync_receiver::config::DEFAULT_MIN_BODY_RATE)]
    pub min_body_rate: u64,
}

impl ConnectionArgs {
    fn limits(&self) -> kitty_sync_receiver::ConnectionLimits {
        kitty_sync_receiver::ConnectionLimits {
            max_connections: usize::try_from(self.max_connections).unwrap_or(usize::MAX),
            header_timeout: Duration::from_secs(self.header_timeout),
            body_timeout: Duration::from_secs(self.body_timeout),
            min_body_rate: self.min_body_rate,
        }
    }
}

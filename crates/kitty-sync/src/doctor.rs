//! `kitty-sync doctor` (contract §10): one verdict per check, each with a hint. It only
//! looks: stores are opened read-only, targets get one health GET (never a batch), and no
//! file is created or changed.

use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use crate::authority::TargetAuthority;
use crate::delivery::receiver::{ExternalReceiver, Gate, HEALTH_PATH, HttpClient, Receiver, TeamspaceReceiver};
use crate::delivery::reset;
use crate::delivery::target::{self, DeploymentMetadata, TargetIdentity, TargetRecord};
use crate::home::{Config, CredentialsFile, Home};
use crate::mode::EventSyncMode;
use crate::store::Store;
use crate::target_url::canonicalize;

const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Ok,
    Warn,
    Fail,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Warn => "warn",
            Verdict::Fail => "fail",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub status: Verdict,
    pub detail: String,
    /// What to do; `null` when the check is ok.
    pub hint: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct DoctorReport {
    pub ok: bool,
    pub checks: Vec<Check>,
}

fn ok(name: &str, detail: impl Into<String>) -> Check {
    Check { name: name.into(), status: Verdict::Ok, detail: detail.into(), hint: None }
}

fn warn(name: &str, detail: impl Into<String>, hint: impl Into<String>) -> Check {
    Check { name: name.into(), status: Verdict::Warn, detail: detail.into(), hint: Some(hint.into()) }
}

fn fail(name: &str, detail: impl Into<String>, hint: impl Into<String>) -> Check {
    Check { name: name.into(), status: Verdict::Fail, detail: detail.into(), hint: Some(hint.into()) }
}

/// Runs every check against `home`.
pub fn run(home: &Home) -> DoctorReport {
    let mut checks = vec![check_home(home)];
    let (store, store_check) = check_store(home);
    checks.push(store_check);
    if let Some(store) = &store {
        checks.push(check_integrity(store));
    }
    let (config, config_check) = check_config(home);
    checks.push(config_check);
    let mode = config.mode().unwrap_or(EventSyncMode::Teamspace);
    // Read once, like every command: the checks below judge the same bytes.
    let credentials = home.read_credentials();
    checks.extend(check_credentials(home, &credentials, mode));
    let authority = TargetAuthority::for_home(home, &config, &credentials).ok();
    let targets = authority.as_ref().map(|a| active_targets(home, &config, &credentials, a));
    // Everything the store is asked is read now: a read-only open of a quiescent store keeps
    // writers waiting while it is open, and the target checks below wait on the network.
    let records: Vec<Option<TargetRecord>> = targets
        .iter()
        .flatten()
        .map(|t| store.as_ref().and_then(|s| target::find(s.conn(), &t.identity).ok().flatten()))
        .collect();
    let legacy = authority.as_ref().map(|a| check_legacy(home, a, store.as_ref()));
    let conflicts = store.as_ref().map(check_conflicts);
    drop(store);
    if let Some(targets) = &targets {
        checks.extend(check_targets(targets, &records));
    }
    checks.extend(legacy);
    checks.push(check_daemon(home));
    checks.extend(conflicts);
    let ok = checks.iter().all(|c| c.status != Verdict::Fail);
    DoctorReport { ok, checks }
}

fn check_home(home: &Home) -> Check {
    let root = home.root();
    if !root.exists() {
        return warn(
            "home",
            format!("{} does not exist yet", root.display()),
            "it is created by the first `kitty-sync emit` (or pass --home DIR)",
        );
    }
    match access(root) {
        Ok(()) => ok("home", format!("{} is readable and writable", root.display())),
        Err(e) => {
            fail("home", format!("{}: {e}", root.display()), format!("fix the permissions of {}", root.display()))
        }
    }
}

fn check_store(home: &Home) -> (Option<Store>, Check) {
    let path = home.store_path();
    if !path.exists() {
        return (None, ok("store", format!("no store yet at {} (created on the first capture)", path.display())));
    }
    for file in [home.sync_dir(), path.clone()] {
        if let Err(e) = access(&file) {
            let hint = format!("make {} readable and writable by this user", file.display());
            return (None, fail("store", format!("{}: {e}", file.display()), hint));
        }
    }
    match Store::open_read_only(home) {
        Ok(Some(store)) => {
            let detail = format!("{} ({} bytes)", path.display(), store.file_bytes());
            (Some(store), ok("store", detail))
        }
        Ok(None) => (None, ok("store", format!("{} is empty (initialised on the first capture)", path.display()))),
        Err(e) => (None, fail("store", e.to_string(), e.hint())),
    }
}

fn check_integrity(store: &Store) -> Check {
    let result: rusqlite::Result<Vec<String>> = store
        .conn()
        .prepare("PRAGMA quick_check")
        .and_then(|mut s| s.query_map([], |r| r.get::<_, String>(0))?.collect());
    match result {
        Ok(lines) if lines == ["ok"] => ok("store_integrity", "PRAGMA quick_check: ok"),
        Ok(lines) => fail(
            "store_integrity",
            format!("PRAGMA quick_check: {}", lines.into_iter().take(3).collect::<Vec<_>>().join("; ")),
            "the store is damaged: stop writers, copy event-sync/ aside, and restore it from a backup",
        ),
        Err(e) => fail(
            "store_integrity",
            format!("PRAGMA quick_check failed: {e}"),
            "restore event-sync/ from a backup, or move the store aside",
        ),
    }
}

fn check_config(home: &Home) -> (Config, Check) {
    let path = home.config_path();
    let config = match home.load_config() {
        Ok(config) => config,
        Err(e) => return (Config::default(), fail("config", e.to_string(), e.hint())),
    };
    if let Err(e) = config.mode() {
        return (config, fail("config", e.to_string(), e.hint()));
    }
    if let Err(e) = config.named_targets.get() {
        return (config, fail("config", e.to_string(), e.hint()));
    }
    let detail = if path.exists() {
        format!("{} parses", path.display())
    } else {
        format!("no {} (defaults apply)", path.display())
    };
    (config, ok("config", detail))
}

fn check_credentials(home: &Home, credentials: &CredentialsFile, mode: EventSyncMode) -> Vec<Check> {
    let path = home.credentials_path();
    match credentials {
        CredentialsFile::Parsed(_) => {}
        CredentialsFile::Absent if mode == EventSyncMode::Teamspace => {
            let check = warn(
                "credentials",
                format!("no {} (Teamspace delivery needs a login)", path.display()),
                "log in with spec-kitty, or choose another mode with `kitty-sync mode`",
            );
            return vec![check];
        }
        CredentialsFile::Absent => {
            return vec![ok("credentials", format!("no {} (not needed in this mode)", path.display()))];
        }
        CredentialsFile::Unreadable { message, hint } => return vec![fail("credentials", message.clone(), hint)],
    }
    vec![ok("credentials", format!("{} parses", path.display())), check_private(&path)]
}

fn check_private(path: &Path) -> Check {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).map(|m| m.permissions().mode() & 0o777).unwrap_or(0);
        if mode & 0o077 != 0 {
            return fail(
                "credentials_permissions",
                format!("{} is readable by others (mode {mode:03o})", path.display()),
                format!("chmod 600 {}", path.display()),
            );
        }
        ok("credentials_permissions", format!("{} is private (mode {mode:03o})", path.display()))
    }
    #[cfg(not(unix))]
    ok("credentials_permissions", format!("{} (permissions not checked on this platform)", path.display()))
}

/// An active target: its name, identity, gates and where its health endpoint is.
struct ActiveTarget {
    name: String,
    identity: TargetIdentity,
    gates: Vec<Gate>,
    origin: Option<String>,
}

fn active_targets(
    home: &Home,
    config: &Config,
    credentials: &CredentialsFile,
    authority: &TargetAuthority,
) -> Vec<ActiveTarget> {
    let client = || HttpClient::new(HEALTH_TIMEOUT);
    let mut out = Vec::new();
    let primary: Option<Box<dyn Receiver>> = match config.mode().unwrap_or(EventSyncMode::Teamspace) {
        EventSyncMode::Teamspace => {
            TeamspaceReceiver::new(home, authority, credentials, client()).ok().map(|r| Box::new(r) as _)
        }
        EventSyncMode::ExternalReceiver => {
            let endpoint = config.external_endpoint.as_deref();
            let token_env = config.external_token_env.as_deref();
            ExternalReceiver::new(endpoint, token_env, client()).ok().map(|r| Box::new(r) as _)
        }
        EventSyncMode::LocalRetention | EventSyncMode::OptOut => None,
    };
    if let Some(receiver) = primary {
        let url = match receiver.identity().kind {
            target::TargetKind::Teamspace => Some(authority.resolved_server_url.clone()),
            target::TargetKind::External => config.external_endpoint.clone(),
        };
        out.push(ActiveTarget {
            name: crate::targets_config::PRIMARY.into(),
            identity: receiver.identity().clone(),
            gates: receiver.gates(),
            origin: url.and_then(|u| canonicalize(&u).ok()).map(|u| u.origin),
        });
    }
    for named in config.named_targets.enabled().unwrap_or_default() {
        out.push(ActiveTarget {
            name: named.name.clone(),
            identity: crate::target_report::named_identity(named),
            gates: Vec::new(),
            origin: Some(named.endpoint.origin.clone()),
        });
    }
    out
}

fn check_targets(targets: &[ActiveTarget], records: &[Option<TargetRecord>]) -> Vec<Check> {
    if targets.is_empty() {
        return vec![ok("targets", "no active target: this mode delivers nowhere and no named target is enabled")];
    }
    targets.iter().zip(records).map(|(t, record)| check_target(t, record.as_ref())).collect()
}

/// `record`: what the store knows of the target (none before its first drain).
fn check_target(t: &ActiveTarget, record: Option<&TargetRecord>) -> Check {
    let name = format!("target:{}", t.name);
    if let Some(gate) = t.gates.iter().find(|g| !g.satisfied) {
        return fail(&name, format!("delivery blocked ({}): {}", gate.reason, gate.message), gate.hint.clone());
    }
    let Some(origin) = &t.origin else {
        return fail(&name, "no URL configured", "set one with `kitty-sync mode` or `kitty-sync target add`");
    };
    let health_url = format!("{origin}{HEALTH_PATH}");
    let reported = match get_health(&health_url) {
        Health::Unreachable(e) => {
            return fail(
                &name,
                format!("{} is not reachable: {e}", t.identity.canonical_url),
                format!("start the receiver or check the network; `{health_url}` must answer"),
            );
        }
        Health::Unhealthy(status) => {
            return warn(
                &name,
                format!("{} answers, but its health endpoint says HTTP {status}", t.identity.canonical_url),
                "reachable; without a health endpoint a wiped receiver cannot be detected",
            );
        }
        Health::Reported(meta) => meta,
    };
    if let Some(record) = record
        && let Some(changed) = reset::detect(&record.deployment, &reported)
    {
        return fail(
            &name,
            format!("{} was replaced behind its URL ({})", t.identity.canonical_url, changed.changed_fields.join(", ")),
            format!("run `{}` to deliver every retained event to the new server", reset::REDRAIN_HINT),
        );
    }
    let seen = if record.is_some() { "health identity unchanged" } else { "not delivered to yet" };
    ok(&name, format!("{} reachable, {seen}", t.identity.canonical_url))
}

enum Health {
    Unreachable(String),
    Unhealthy(u16),
    Reported(DeploymentMetadata),
}

fn get_health(url: &str) -> Health {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(HEALTH_TIMEOUT))
        .http_status_as_error(false)
        .user_agent(concat!("kitty-sync/", env!("CARGO_PKG_VERSION")))
        .build()
        .into();
    let mut response = match agent.get(url).call() {
        Ok(r) => r,
        Err(e) => return Health::Unreachable(e.to_string()),
    };
    let status = response.status().as_u16();
    let body = response.body_mut().with_config().limit(1024 * 1024).read_to_string().ok();
    let value = body.and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok());
    match value {
        Some(v) if status == 200 => {
            let field = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
            Health::Reported(DeploymentMetadata {
                server_instance_id: field("server_instance_id"),
                deployment_id: field("deployment_id"),
                environment_name: field("environment_name"),
                git_sha: field("git_sha"),
            })
        }
        _ => Health::Unhealthy(status),
    }
}

fn check_legacy(home: &Home, authority: &TargetAuthority, store: Option<&Store>) -> Check {
    let report = crate::legacy::legacy_queues_report(home, authority, store);
    let pending: Vec<&str> = report.files.iter().filter(|f| !f.migrated).map(|f| f.path.as_str()).collect();
    if pending.is_empty() {
        let detail = if report.files.is_empty() {
            "no legacy spec-kitty stores".to_string()
        } else {
            format!("{} legacy store(s), all migrated", report.files.len())
        };
        return ok("legacy_stores", detail);
    }
    warn(
        "legacy_stores",
        format!("{} legacy store(s) not migrated yet: {}", pending.len(), pending.join(", ")),
        "run `kitty-sync migrate --dry-run`, then `kitty-sync migrate` (sources are only read)",
    )
}

/// The daemon's own rule decides "running" (`DaemonState::is_running`), as for `status`.
fn check_daemon(home: &Home) -> Check {
    let state = match crate::daemon::state::read(home) {
        Ok(Some(state)) => state,
        Ok(None) => return ok("daemon", "no daemon state (none was run)"),
        Err(e) => return fail("daemon", e.to_string(), e.hint()),
    };
    if let Some(at) = &state.stopped_at {
        return ok("daemon", format!("stopped cleanly at {at}"));
    }
    let pid = state.pid;
    let restart = "restart it (`kitty-sync daemon`, or through its systemd/launchd unit); nothing was lost: `kitty-sync now` delivers meanwhile";
    if state.is_running(crate::clock::now_ms()) {
        return ok("daemon", format!("running (pid {pid}, heartbeat at {})", state.heartbeat_at));
    }
    if crate::daemon::state::pid_alive(pid) {
        let detail = format!("pid {pid} is alive but its heartbeat ({}) is stale (hung?)", state.heartbeat_at);
        return fail("daemon", detail, restart);
    }
    fail("daemon", format!("not running: pid {pid} is gone without a clean stop"), restart)
}

fn check_conflicts(store: &Store) -> Check {
    match crate::legacy::conflict_summary(store) {
        Ok(summary) if summary.count == 0 => ok("conflicts", "no unresolved migration conflicts"),
        Ok(summary) => fail(
            "conflicts",
            format!("{} unresolved migration conflict(s)", summary.count),
            "review them with `kitty-sync migrate conflicts`, then `kitty-sync migrate resolve ID --keep journal|incoming`",
        ),
        Err(e) => fail("conflicts", e.to_string(), e.hint()),
    }
}

/// Readable, writable (and searchable, for a directory) by this process, per access(2).
fn access(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
        let mut mode = libc::R_OK | libc::W_OK;
        if path.is_dir() {
            mode |= libc::X_OK;
        }
        // SAFETY: a valid NUL-terminated path for the duration of the call.
        if unsafe { libc::access(c_path.as_ptr(), mode) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
    #[cfg(not(unix))]
    std::fs::metadata(path).map(|_| ())
}

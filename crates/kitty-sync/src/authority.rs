//! Target authority (contract §4): the one place that decides, once per process, which server
//! URL everything uses, and the legacy queue scope derived from it.

use serde::Serialize;

use crate::envelope::sha256_hex;
use crate::error::Result;
use crate::home::{Config, Credentials, CredentialsFile, Home};
use crate::target_url::redact_url;

pub const SAAS_URL_ENV: &str = "SPEC_KITTY_SAAS_URL";
pub const ENABLE_SAAS_SYNC_ENV: &str = "SPEC_KITTY_ENABLE_SAAS_SYNC";
pub const DEFAULT_SERVER_URL: &str = "https://spec-kitty-dev.fly.dev";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OverrideMode {
    None,
    ProcessOverride,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ActiveScopeStatus {
    Absent,
    Matches,
    StaleNonAuthoritative,
}

/// The resolved target authority. Serialises to the contract's `target_authority` object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
/// URLs serialise through [`redact_url`]: a password or key typed into `config.toml` or the
/// environment is used for requests, never shown.
pub struct TargetAuthority {
    #[serde(serialize_with = "shown_optional_url")]
    pub configured_server_url: Option<String>,
    #[serde(serialize_with = "shown_optional_url")]
    pub env_server_url: Option<String>,
    pub override_mode: OverrideMode,
    #[serde(serialize_with = "shown_url")]
    pub resolved_server_url: String,
    pub user_id: Option<String>,
    pub team_slug: Option<String>,
    #[serde(serialize_with = "shown_scope")]
    pub derived_queue_scope: String,
    pub queue_db_path: String,
    #[serde(serialize_with = "shown_optional_scope")]
    pub active_queue_scope: Option<String>,
    pub active_queue_scope_status: ActiveScopeStatus,
    pub warnings: Vec<String>,
}

/// `server|user|team` with the server part shown as [`redact_url`] shows it.
pub fn redact_scope(scope: &str) -> String {
    let mut parts = scope.rsplitn(3, '|');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(team), Some(user), Some(server)) => format!("{}|{user}|{team}", redact_url(server)),
        _ => scope.to_string(),
    }
}

type SerResult<S> = std::result::Result<<S as serde::Serializer>::Ok, <S as serde::Serializer>::Error>;

fn shown_url<S: serde::Serializer>(url: &str, serializer: S) -> SerResult<S> {
    serializer.serialize_str(&redact_url(url))
}

fn shown_scope<S: serde::Serializer>(scope: &str, serializer: S) -> SerResult<S> {
    serializer.serialize_str(&redact_scope(scope))
}

fn shown_optional<S: serde::Serializer>(
    text: &Option<String>,
    show: fn(&str) -> String,
    serializer: S,
) -> SerResult<S> {
    match text {
        Some(text) => serializer.serialize_some(&show(text)),
        None => serializer.serialize_none(),
    }
}

fn shown_optional_url<S: serde::Serializer>(url: &Option<String>, serializer: S) -> SerResult<S> {
    shown_optional(url, redact_url, serializer)
}

fn shown_optional_scope<S: serde::Serializer>(scope: &Option<String>, serializer: S) -> SerResult<S> {
    shown_optional(scope, redact_scope, serializer)
}

/// Everything the resolver reads, gathered up front so resolution itself is pure.
#[derive(Debug, Clone, Default)]
pub struct AuthorityInputs {
    pub configured_server_url: Option<String>,
    pub env_server_url: Option<String>,
    pub credentials: Option<Credentials>,
    pub active_queue_scope: Option<String>,
}

impl AuthorityInputs {
    /// Gathers config, the credentials read once by the caller, `active_queue_scope` and the
    /// environment. A credentials file that cannot be read does not stop the caller; it
    /// becomes a warning.
    pub fn gather(home: &Home, config: &Config, credentials: &CredentialsFile) -> (AuthorityInputs, Vec<String>) {
        let warnings = credentials.warning().into_iter().collect();
        let credentials = credentials.credentials().cloned();
        let active_queue_scope = std::fs::read_to_string(home.active_queue_scope_path())
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty());
        let inputs = AuthorityInputs {
            configured_server_url: config.server_url.clone(),
            env_server_url: std::env::var(SAAS_URL_ENV).ok(),
            credentials,
            active_queue_scope,
        };
        (inputs, warnings)
    }
}

fn strip_url(url: &str) -> String {
    url.trim().trim_end_matches('/').to_string()
}

fn same_url(a: &str, b: &str) -> bool {
    match (crate::target_url::canonicalize(a), crate::target_url::canonicalize(b)) {
        (Ok(x), Ok(y)) => x.canonical == y.canonical,
        _ => strip_url(a) == strip_url(b),
    }
}

impl TargetAuthority {
    pub fn resolve(inputs: &AuthorityInputs) -> TargetAuthority {
        let configured = inputs.configured_server_url.as_deref().map(strip_url).filter(|s| !s.is_empty());
        let env = inputs.env_server_url.as_deref().map(strip_url).filter(|s| !s.is_empty());
        let override_mode = match (&env, &configured) {
            (None, _) => OverrideMode::None,
            (Some(e), Some(c)) if same_url(e, c) => OverrideMode::None,
            (Some(_), _) => OverrideMode::ProcessOverride,
        };
        let resolved = env.clone().or_else(|| configured.clone()).unwrap_or_else(|| DEFAULT_SERVER_URL.to_string());
        let mut warnings = Vec::new();
        if override_mode == OverrideMode::ProcessOverride {
            let config_text = configured
                .as_deref()
                .map(|c| format!("[sync] server_url {}", redact_url(c)))
                .unwrap_or_else(|| format!("the default server {DEFAULT_SERVER_URL} ([sync] server_url is not set)"));
            warnings.push(format!(
                "{SAAS_URL_ENV}={} overrides {config_text} for this process",
                redact_url(env.as_deref().unwrap_or_default())
            ));
        }
        // The env and the file are not validated when they are written by hand; say so once
        // here rather than letting every request fail later with a transport error.
        if let Err(e) = crate::target_url::canonicalize(&resolved) {
            let (source, fix) = if env.is_some() {
                (SAAS_URL_ENV, format!("set {SAAS_URL_ENV} to a valid URL or unset it"))
            } else {
                ("[sync] server_url", "set a valid one with `kitty-sync server URL`".to_string())
            };
            warnings.push(format!("the server URL from {source} cannot be used: {e}; {fix}"));
        }
        let credentials = inputs.credentials.as_ref();
        let user_id = credentials.and_then(|c| c.username.clone());
        let team_slug = credentials.and_then(|c| c.team_slug.clone());
        let derived_queue_scope = queue_scope(&resolved, user_id.as_deref(), team_slug.as_deref());
        let queue_db_path = match user_id {
            Some(_) => format!("queues/queue-{}.db", scope_digest(&derived_queue_scope)),
            None => "queue.db".to_string(),
        };
        let active_queue_scope_status = match &inputs.active_queue_scope {
            None => ActiveScopeStatus::Absent,
            Some(s) if *s == derived_queue_scope => ActiveScopeStatus::Matches,
            Some(_) => ActiveScopeStatus::StaleNonAuthoritative,
        };
        TargetAuthority {
            configured_server_url: configured,
            env_server_url: env,
            override_mode,
            resolved_server_url: resolved,
            user_id,
            team_slug,
            derived_queue_scope,
            queue_db_path,
            active_queue_scope: inputs.active_queue_scope.clone(),
            active_queue_scope_status,
            warnings,
        }
    }

    /// Resolves from the home and the process environment.
    pub fn for_home(home: &Home, config: &Config, credentials: &CredentialsFile) -> Result<TargetAuthority> {
        let (inputs, mut warnings) = AuthorityInputs::gather(home, config, credentials);
        let mut authority = TargetAuthority::resolve(&inputs);
        authority.warnings.append(&mut warnings);
        Ok(authority)
    }

    /// The legacy digest of the derived scope (the name part of `queues/queue-<digest>.db`).
    pub fn derived_digest(&self) -> String {
        scope_digest(&self.derived_queue_scope)
    }
}

/// spec-kitty 3.2.3's scope rule: each part trimmed and lower-cased, the server without
/// trailing `/`; a known user without a team uses the literal `no-team`.
pub fn queue_scope(server: &str, user: Option<&str>, team: Option<&str>) -> String {
    let server = server.trim().to_lowercase();
    let server = server.trim_end_matches('/');
    let user = user.map(|u| u.trim().to_lowercase()).unwrap_or_default();
    let team = match team.map(|t| t.trim().to_lowercase()).filter(|t| !t.is_empty()) {
        Some(t) => t,
        None if !user.is_empty() => "no-team".to_string(),
        None => String::new(),
    };
    format!("{server}|{user}|{team}")
}

/// First 16 hex characters of SHA-256 of the scope.
pub fn scope_digest(scope: &str) -> String {
    sha256_hex(scope.as_bytes())[..16].to_string()
}

/// `SPEC_KITTY_ENABLE_SAAS_SYNC` truthiness: `1,true,yes,y,on`, case-insensitive.
pub fn saas_sync_enabled() -> bool {
    std::env::var(ENABLE_SAAS_SYNC_ENV).map(|v| is_truthy(&v)).unwrap_or(false)
}

pub fn is_truthy(value: &str) -> bool {
    matches!(value.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "y" | "on")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(user: &str, team: Option<&str>) -> Credentials {
        Credentials { username: Some(user.into()), team_slug: team.map(Into::into), ..Default::default() }
    }

    #[test]
    fn scope_rule_matches_spec_kitty_323() {
        let scope = queue_scope("https://Spec-Kitty-Dev.fly.dev/ ", Some(" Alice@Example.com"), Some("Team-X"));
        assert_eq!(scope, "https://spec-kitty-dev.fly.dev|alice@example.com|team-x");
        assert_eq!(scope_digest(&scope), "4d10eafbb53d5a8b");
        // The public legacy fixture's scope A.
        let a = queue_scope("https://spec-kitty-dev.fly.dev", Some("alice@example.com"), Some("team-alpha"));
        assert_eq!(scope_digest(&a), "f7b048d5c00bc4e2");
    }

    #[test]
    fn defaults_without_anything() {
        let a = TargetAuthority::resolve(&AuthorityInputs::default());
        assert_eq!(a.resolved_server_url, DEFAULT_SERVER_URL);
        assert_eq!(a.override_mode, OverrideMode::None);
        assert_eq!(a.queue_db_path, "queue.db");
        assert_eq!(a.active_queue_scope_status, ActiveScopeStatus::Absent);
        assert!(a.warnings.is_empty());
    }

    #[test]
    fn env_override_wins_and_warns() {
        let inputs = AuthorityInputs {
            configured_server_url: Some("https://config.example/".into()),
            env_server_url: Some("https://env.example/".into()),
            credentials: Some(creds("alice@example.com", Some("team-alpha"))),
            active_queue_scope: None,
        };
        let a = TargetAuthority::resolve(&inputs);
        assert_eq!(a.resolved_server_url, "https://env.example");
        assert_eq!(a.override_mode, OverrideMode::ProcessOverride);
        assert_eq!(a.warnings.len(), 1);
        assert!(a.warnings[0].contains("https://env.example") && a.warnings[0].contains("https://config.example"));
        assert!(a.warnings[0].contains(SAAS_URL_ENV));
        assert_eq!(a.derived_queue_scope, "https://env.example|alice@example.com|team-alpha");
    }

    #[test]
    fn url_secrets_are_never_shown() {
        let inputs = AuthorityInputs {
            configured_server_url: Some("https://u:pw-secret@config.example".into()),
            env_server_url: Some("https://env.example/?token=tok-secret".into()),
            ..Default::default()
        };
        let a = TargetAuthority::resolve(&inputs);
        let shown = format!("{}{:?}", serde_json::to_string(&a).unwrap(), a.warnings);
        assert!(!shown.contains("pw-secret") && !shown.contains("tok-secret"), "{shown}");
        assert_eq!(a.resolved_server_url, "https://env.example/?token=tok-secret", "requests use the real URL");
    }

    #[test]
    fn env_equal_to_config_is_no_override() {
        let inputs = AuthorityInputs {
            configured_server_url: Some("https://Same.example".into()),
            env_server_url: Some("https://same.example/".into()),
            ..Default::default()
        };
        let a = TargetAuthority::resolve(&inputs);
        assert_eq!(a.override_mode, OverrideMode::None);
        assert!(a.warnings.is_empty());
        let blank = AuthorityInputs { env_server_url: Some("  ".into()), ..Default::default() };
        assert_eq!(TargetAuthority::resolve(&blank).env_server_url, None);
    }

    #[test]
    fn unusable_urls_are_a_warning() {
        let inputs = AuthorityInputs { env_server_url: Some("ftp://x".into()), ..Default::default() };
        let a = TargetAuthority::resolve(&inputs);
        assert_eq!(a.resolved_server_url, "ftp://x", "the env still wins");
        assert_eq!(a.warnings.len(), 2, "{:?}", a.warnings);
        assert!(a.warnings[1].contains(SAAS_URL_ENV) && a.warnings[1].contains("ftp"), "{:?}", a.warnings);
        let inputs = AuthorityInputs { configured_server_url: Some("http://example.com".into()), ..Default::default() };
        let a = TargetAuthority::resolve(&inputs);
        assert_eq!(a.warnings.len(), 1);
        assert!(a.warnings[0].contains("[sync] server_url") && a.warnings[0].contains("loopback"), "{:?}", a.warnings);
        assert!(TargetAuthority::resolve(&AuthorityInputs::default()).warnings.is_empty());
    }

    #[test]
    fn active_scope_is_diagnostic() {
        let mut inputs = AuthorityInputs {
            credentials: Some(creds("alice@example.com", Some("team-alpha"))),
            active_queue_scope: Some("https://spec-kitty-dev.fly.dev|alice@example.com|team-alpha".into()),
            ..Default::default()
        };
        assert_eq!(TargetAuthority::resolve(&inputs).active_queue_scope_status, ActiveScopeStatus::Matches);
        assert_eq!(TargetAuthority::resolve(&inputs).queue_db_path, "queues/queue-f7b048d5c00bc4e2.db");
        inputs.active_queue_scope = Some("https://other|x|y".into());
        assert_eq!(
            TargetAuthority::resolve(&inputs).active_queue_scope_status,
            ActiveScopeStatus::StaleNonAuthoritative
        );
    }

    #[test]
    fn truthy_values() {
        for v in ["1", "true", "YES", "y", "On", " on "] {
            assert!(is_truthy(v), "{v}");
        }
        for v in ["0", "false", "", "enabled"] {
            assert!(!is_truthy(v), "{v}");
        }
    }
}

//! Receivers: where a drain posts batches. One trait for every kind, so the dispatcher has
//! one path; each receiver declares its own gates, endpoint, headers and auth renewal.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use super::target::{DeploymentMetadata, TargetIdentity, TargetKind};
use super::wire::{HttpReply, parse_retry_after};
use crate::authority::{TargetAuthority, saas_sync_enabled};
use crate::error::{Error, Result};
use crate::home::{Credentials, Home, write_atomically};
use crate::target_url::canonicalize;

/// Batch endpoint path on a Teamspace-compatible server (trailing slash required).
pub const BATCH_PATH: &str = "/api/v1/events/batch/";
pub const HEALTH_PATH: &str = "/api/v1/sync/health/";
pub const REFRESH_PATH: &str = "/api/v1/token/refresh/";

/// One declared precondition of delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gate {
    /// The contract's blocked-reason token, e.g. `saas_disabled`.
    pub reason: &'static str,
    pub satisfied: bool,
    pub message: String,
    pub hint: String,
}

/// A transport-level failure (connection refused, timeout, TLS, ...).
#[derive(Debug, Clone, thiserror::Error)]
#[error("transport failure: {0}")]
pub struct TransportError(pub String);

pub trait Receiver {
    fn identity(&self) -> &TargetIdentity;
    /// The URL batches are posted to.
    fn batch_url(&self) -> &str;
    /// Preconditions, all of which must hold before anything is posted.
    fn gates(&self) -> Vec<Gate>;
    /// Team isolation: only events captured without a team or with this team are sent.
    fn team(&self) -> Option<&str>;
    /// Called once before the first post (e.g. refresh an access token known to be expired).
    fn prepare(&mut self) -> Result<()>;
    /// Posts one gzip-compressed `{"events":[...]}` body.
    fn post_batch(&mut self, gzip_body: &[u8]) -> std::result::Result<HttpReply, TransportError>;
    /// After a 401/403: renew credentials if possible. `true` means "send the batch again once".
    fn renew_auth(&mut self) -> Result<bool>;
    /// Deployment facts from the health endpoint; `None` when the server has none.
    fn health(&mut self) -> Option<DeploymentMetadata>;
}

/// The HTTP client every receiver shares.
pub struct HttpClient {
    agent: ureq::Agent,
    health_agent: ureq::Agent,
}

/// The largest response body read from a receiver (a batch answer is small).
const MAX_RESPONSE_BYTES: u64 = 16 * 1024 * 1024;

impl HttpClient {
    pub fn new(timeout: Duration) -> HttpClient {
        let build = |t: Duration| -> ureq::Agent {
            ureq::Agent::config_builder()
                .timeout_global(Some(t))
                .http_status_as_error(false)
                .user_agent(concat!("kitty-sync/", env!("CARGO_PKG_VERSION")))
                .build()
                .into()
        };
        HttpClient { agent: build(timeout), health_agent: build(timeout.min(Duration::from_secs(3))) }
    }

    pub fn post(
        &self,
        url: &str,
        headers: &[(&str, String)],
        body: &[u8],
    ) -> std::result::Result<HttpReply, TransportError> {
        let mut request = self.agent.post(url);
        for (name, value) in headers {
            request = request.header(*name, value.as_str());
        }
        let response = request.send(body).map_err(|e| TransportError(e.to_string()))?;
        read_reply(response)
    }

    /// GETs JSON with a short timeout; `None` on any failure (health is optional).
    pub fn get_json(&self, url: &str) -> Option<Value> {
        let mut response = self.health_agent.get(url).call().ok()?;
        if response.status().as_u16() != 200 {
            return None;
        }
        let text = response.body_mut().with_config().limit(1024 * 1024).read_to_string().ok()?;
        serde_json::from_str(&text).ok()
    }
}

fn read_reply(mut response: ureq::http::Response<ureq::Body>) -> std::result::Result<HttpReply, TransportError> {
    let status = response.status().as_u16();
    let retry_after = response.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(parse_retry_after);
    let body = response
        .body_mut()
        .with_config()
        .limit(MAX_RESPONSE_BYTES)
        .read_to_vec()
        .map_err(|e| TransportError(format!("reading the response: {e}")))?;
    Ok(HttpReply { status, body, retry_after })
}

fn health_metadata(client: &HttpClient, origin: &str) -> Option<DeploymentMetadata> {
    let body = client.get_json(&format!("{origin}{HEALTH_PATH}"))?;
    let field = |k: &str| body.get(k).and_then(Value::as_str).map(str::to_string);
    Some(DeploymentMetadata {
        server_instance_id: field("server_instance_id"),
        deployment_id: field("deployment_id"),
        environment_name: field("environment_name"),
        git_sha: field("git_sha"),
    })
}

fn json_headers(token: Option<&str>) -> Vec<(&'static str, String)> {
    let mut headers = vec![("Content-Type", "application/json".to_string()), ("Content-Encoding", "gzip".to_string())];
    if let Some(token) = token {
        headers.push(("Authorization", format!("Bearer {token}")));
    }
    headers
}

/// An operator's own receiver (or the built-in one): the endpoint is posted to verbatim.
pub struct ExternalReceiver {
    identity: TargetIdentity,
    endpoint: Option<String>,
    origin: String,
    token_env: Option<String>,
    token: Option<String>,
    client: HttpClient,
}

impl ExternalReceiver {
    pub fn new(endpoint: Option<&str>, token_env: Option<&str>, client: HttpClient) -> Result<ExternalReceiver> {
        let parsed = endpoint.map(canonicalize).transpose()?;
        let token = token_env.and_then(|var| std::env::var(var).ok()).filter(|t| !t.trim().is_empty());
        Ok(ExternalReceiver {
            identity: TargetIdentity {
                kind: TargetKind::External,
                canonical_url: parsed.as_ref().map(|p| p.canonical.clone()).unwrap_or_default(),
                team_slug: String::new(),
                user_email: String::new(),
            },
            endpoint: parsed.as_ref().map(|p| p.raw.clone()),
            origin: parsed.map(|p| p.origin).unwrap_or_default(),
            token_env: token_env.map(str::to_string),
            token,
            client,
        })
    }

    /// Set when a token variable is configured but empty or absent in this environment.
    pub fn missing_token_env(&self) -> Option<&str> {
        match (&self.token_env, &self.token) {
            (Some(var), None) => Some(var),
            _ => None,
        }
    }
}

impl Receiver for ExternalReceiver {
    fn identity(&self) -> &TargetIdentity {
        &self.identity
    }

    fn batch_url(&self) -> &str {
        self.endpoint.as_deref().unwrap_or_default()
    }

    fn gates(&self) -> Vec<Gate> {
        vec![Gate {
            reason: "missing_endpoint",
            satisfied: self.endpoint.is_some(),
            message: "external-receiver mode has no endpoint configured".into(),
            hint: "run `kitty-sync mode external-receiver --endpoint URL`".into(),
        }]
    }

    fn team(&self) -> Option<&str> {
        None
    }

    fn prepare(&mut self) -> Result<()> {
        Ok(())
    }

    fn post_batch(&mut self, gzip_body: &[u8]) -> std::result::Result<HttpReply, TransportError> {
        let url = self.endpoint.clone().unwrap_or_default();
        self.client.post(&url, &json_headers(self.token.as_deref()), gzip_body)
    }

    fn renew_auth(&mut self) -> Result<bool> {
        Ok(false)
    }

    fn health(&mut self) -> Option<DeploymentMetadata> {
        health_metadata(&self.client, &self.origin)
    }
}

/// Teamspace: the resolved server, a bearer token from `credentials`, `X-Team-Slug`, and one
/// token refresh per drain.
pub struct TeamspaceReceiver {
    identity: TargetIdentity,
    server: String,
    batch_url: String,
    credentials_path: PathBuf,
    credentials: Credentials,
    saas_enabled: bool,
    refreshed: bool,
    client: HttpClient,
}

impl TeamspaceReceiver {
    pub fn new(home: &Home, authority: &TargetAuthority, client: HttpClient) -> Result<TeamspaceReceiver> {
        let target = canonicalize(&authority.resolved_server_url)?;
        let credentials = home.load_credentials()?.unwrap_or_default();
        let server = authority.resolved_server_url.trim_end_matches('/').to_string();
        Ok(TeamspaceReceiver {
            identity: TargetIdentity {
                kind: TargetKind::Teamspace,
                canonical_url: target.canonical,
                team_slug: authority.team_slug.clone().unwrap_or_default(),
                user_email: authority.user_id.clone().unwrap_or_default(),
            },
            batch_url: format!("{server}{BATCH_PATH}"),
            server,
            credentials_path: home.credentials_path(),
            credentials,
            saas_enabled: saas_sync_enabled(),
            refreshed: false,
            client,
        })
    }

    fn refresh(&mut self) -> Result<()> {
        let refresh_token = self.credentials.refresh_token.clone().unwrap_or_default();
        let body = serde_json::json!({ "refresh": refresh_token }).to_string();
        let url = format!("{}{REFRESH_PATH}", self.server);
        let headers = [("Content-Type", "application/json".to_string())];
        let reply = self.client.post(&url, &headers, body.as_bytes()).map_err(|e| refresh_failed(&e.to_string()))?;
        if reply.status != 200 {
            return Err(refresh_failed(&format!("HTTP {}", reply.status)));
        }
        let json: Value = serde_json::from_slice(&reply.body).map_err(|_| refresh_failed("the answer is not JSON"))?;
        let pick = |keys: &[&str]| keys.iter().find_map(|k| json.get(*k).and_then(Value::as_str)).map(str::to_string);
        let access =
            pick(&["access", "access_token"]).ok_or_else(|| refresh_failed("no access token in the answer"))?;
        self.credentials.access_token = Some(access);
        if let Some(refresh) = pick(&["refresh", "refresh_token"]) {
            self.credentials.refresh_token = Some(refresh);
        }
        self.credentials.access_expires_at = pick(&["access_expires_at", "expires_at"]);
        if let Some(at) = pick(&["refresh_expires_at"]) {
            self.credentials.refresh_expires_at = Some(at);
        }
        self.refreshed = true;
        save_tokens(&self.credentials_path, &self.credentials)
    }
}

fn refresh_failed(why: &str) -> Error {
    Error::blocked(
        format!("the Teamspace access token could not be refreshed: {why}"),
        "log in again with spec-kitty (`spec-kitty auth login`), then run `kitty-sync now`",
    )
}

/// Rewrites the `[tokens]` of `credentials` atomically with mode 0600, keeping everything else
/// (a file that no longer parses is left alone: the refreshed token is then used for this
/// drain only).
fn save_tokens(path: &std::path::Path, c: &Credentials) -> Result<()> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io("cannot read", path, e))?;
    let mut doc = text.parse::<toml_edit::DocumentMut>().map_err(|e| {
        Error::usage(
            format!("{} no longer parses as TOML ({}); the refreshed token was not saved", path.display(), e.message()),
            "log in again with spec-kitty to rewrite the credentials file",
        )
    })?;
    let fields = [
        ("access", &c.access_token),
        ("refresh", &c.refresh_token),
        ("access_expires_at", &c.access_expires_at),
        ("refresh_expires_at", &c.refresh_expires_at),
    ];
    for (key, value) in fields {
        match value {
            Some(v) => crate::home::set_config_string(&mut doc, path, "tokens", key, v)?,
            None => {
                if let Some(t) = doc.get_mut("tokens").and_then(|t| t.as_table_like_mut()) {
                    t.remove(key);
                }
            }
        }
    }
    write_atomically(path, doc.to_string().as_bytes(), Some(0o600))
}

impl Receiver for TeamspaceReceiver {
    fn identity(&self) -> &TargetIdentity {
        &self.identity
    }

    fn batch_url(&self) -> &str {
        &self.batch_url
    }

    fn gates(&self) -> Vec<Gate> {
        let now = jiff::Timestamp::now();
        let auth = self.credentials.has_usable_access(now) || self.credentials.can_refresh(now);
        vec![
            Gate {
                reason: "saas_disabled",
                satisfied: self.saas_enabled,
                message: "Teamspace delivery is disabled (SPEC_KITTY_ENABLE_SAAS_SYNC is not on)".into(),
                hint: "export SPEC_KITTY_ENABLE_SAAS_SYNC=1, or deliver elsewhere with `kitty-sync mode external-receiver --endpoint URL`".into(),
            },
            Gate {
                reason: "missing_auth",
                satisfied: auth,
                message: format!("no usable Teamspace access token in {}", self.credentials_path.display()),
                hint: "log in with spec-kitty (`spec-kitty auth login`) so [tokens] access is present".into(),
            },
            Gate {
                reason: "missing_team",
                satisfied: !self.identity.team_slug.is_empty(),
                message: format!("no team in {} ([user] team_slug)", self.credentials_path.display()),
                hint: "log in with spec-kitty to a team, or set [user] team_slug in credentials".into(),
            },
        ]
    }

    fn team(&self) -> Option<&str> {
        Some(&self.identity.team_slug)
    }

    fn prepare(&mut self) -> Result<()> {
        let now = jiff::Timestamp::now();
        if !self.credentials.has_usable_access(now) && self.credentials.can_refresh(now) {
            self.refresh()?;
        }
        Ok(())
    }

    fn post_batch(&mut self, gzip_body: &[u8]) -> std::result::Result<HttpReply, TransportError> {
        let mut headers = json_headers(self.credentials.access_token.as_deref());
        headers.push(("X-Team-Slug", self.identity.team_slug.clone()));
        self.client.post(&self.batch_url, &headers, gzip_body)
    }

    fn renew_auth(&mut self) -> Result<bool> {
        if self.refreshed || !self.credentials.can_refresh(jiff::Timestamp::now()) {
            return Ok(false);
        }
        self.refresh()?;
        Ok(true)
    }

    fn health(&mut self) -> Option<DeploymentMetadata> {
        health_metadata(&self.client, &self.server)
    }
}

//! Receivers: where a drain posts batches. One trait for every kind, so the dispatcher has
//! one path; each receiver declares its own gates, endpoint, headers and auth renewal.

use std::time::Duration;

use serde_json::Value;

use super::target::{DeploymentMetadata, TargetIdentity, TargetKind};
use super::wire::{HttpReply, parse_retry_after};
use crate::authority::TargetAuthority;
use crate::error::{Error, Result};
use crate::event_journal::TeamspaceGates;
use crate::home::{Credentials, CredentialsFile, Home, write_atomically};
use crate::target_url::{REDACTED, canonicalize, redact_url};

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
    /// After the drain, whatever its outcome: what the receiver could not persist (a rotated
    /// token it could not save) as an error the command must report.
    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
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
        let secrets = Secrets::of_request(url, headers);
        let response = request.send(body).map_err(|e| TransportError(secrets.redact(&e.to_string())))?;
        let mut reply = read_reply(response).map_err(|e| TransportError(secrets.redact(&e.0)))?;
        // The reply's text becomes error messages and attempt history: a receiver that echoes
        // the request (a 401 quoting the bearer token) must not make us print or store it.
        reply.body = secrets.redact_bytes(reply.body);
        Ok(reply)
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

/// What a request carried that must never come back out: bearer tokens, and the URL as sent
/// (its password and key-like query values).
struct Secrets {
    tokens: Vec<String>,
    url: String,
    shown_url: String,
}

impl Secrets {
    fn of_request(url: &str, headers: &[(&str, String)]) -> Secrets {
        let tokens = headers
            .iter()
            .filter(|(name, _)| name.eq_ignore_ascii_case("authorization"))
            .filter_map(|(_, value)| value.split_once(' ').map(|(_, token)| token.trim().to_string()))
            .filter(|t| !t.is_empty())
            .collect();
        Secrets { tokens, url: url.to_string(), shown_url: redact_url(url) }
    }

    fn redact(&self, text: &str) -> String {
        let mut text = text.replace(&self.url, &self.shown_url);
        for token in &self.tokens {
            text = text.replace(token.as_str(), REDACTED);
        }
        text
    }

    fn redact_bytes(&self, body: Vec<u8>) -> Vec<u8> {
        let leaks = |b: &[u8]| self.tokens.iter().any(|t| b.windows(t.len()).any(|w| w == t.as_bytes()));
        if !leaks(&body) {
            return body;
        }
        self.redact(&String::from_utf8_lossy(&body)).into_bytes()
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
    home: Home,
    credentials: Credentials,
    refreshed: bool,
    /// A rotated token that could not be written back (reported by `finish`).
    unsaved: Option<Error>,
    /// Why `credentials` could not be read, for the `missing_auth` gate's message.
    unreadable: Option<String>,
    client: HttpClient,
}

impl TeamspaceReceiver {
    /// `credentials` is the file as the process read it once; an unreadable file leaves the
    /// `missing_auth` gate closed (the caller decides whether that stops it).
    pub fn new(
        home: &Home,
        authority: &TargetAuthority,
        credentials: &CredentialsFile,
        client: HttpClient,
    ) -> Result<TeamspaceReceiver> {
        let target = canonicalize(&authority.resolved_server_url)?;
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
            home: home.clone(),
            credentials: credentials.credentials().cloned().unwrap_or_default(),
            refreshed: false,
            unsaved: None,
            unreadable: match credentials {
                CredentialsFile::Unreadable { message, .. } => Some(message.clone()),
                _ => None,
            },
            client,
        })
    }

    /// Renews the access token, once per drain. Under the credentials lock, the file is read
    /// again first: another process (spec-kitty, another kitty-sync) may have refreshed and
    /// rotated the refresh token meanwhile, and a used refresh token must never be sent. Its
    /// newer access token is then taken as is; otherwise the newest refresh token is sent and
    /// the answer written back under the same lock. `false` when there is nothing to refresh
    /// with.
    fn refresh(&mut self) -> Result<bool> {
        self.refreshed = true;
        let path = self.home.credentials_path();
        let _lock = self.home.lock_credentials()?;
        let latest = match CredentialsFile::read(&path) {
            CredentialsFile::Parsed(c) => c,
            CredentialsFile::Absent => return Err(refresh_failed(&format!("{} no longer exists", path.display()))),
            CredentialsFile::Unreadable { message, hint } => {
                return Err(Error::usage(format!("cannot refresh the Teamspace token: {message}"), hint));
            }
        };
        self.check_same_login(&latest)?;
        let now = jiff::Timestamp::now();
        if latest.access_token != self.credentials.access_token && latest.has_usable_access(now) {
            self.credentials = latest;
            return Ok(true);
        }
        if !latest.can_refresh(now) {
            return Ok(false);
        }
        let mut updated = latest;
        self.request_tokens(&mut updated)?;
        self.credentials = updated;
        if let Err(e) = save_tokens(&path, &self.credentials) {
            // The server has rotated the tokens: the old refresh token in the file is used up.
            // Keep delivering with the new ones (held in memory only) and say so at the end.
            self.unsaved = Some(unsaved_tokens(&path, &e));
        }
        Ok(true)
    }

    /// Tokens of another user or team (a new login meanwhile) must not carry this drain's
    /// events, which were selected for this target's team.
    fn check_same_login(&self, latest: &Credentials) -> Result<()> {
        let team = latest.team_slug.clone().unwrap_or_default();
        let user = latest.username.clone().unwrap_or_default();
        if team == self.identity.team_slug && user == self.identity.user_email {
            return Ok(());
        }
        Err(Error::blocked(
            "the Teamspace login in credentials changed during this run (another user or team); nothing more was sent",
            "run `kitty-sync now` again to deliver as the new login",
        ))
    }

    /// POSTs the refresh token of `tokens` and puts the answer into it.
    fn request_tokens(&self, tokens: &mut Credentials) -> Result<()> {
        let body = serde_json::json!({ "refresh": tokens.refresh_token.clone().unwrap_or_default() }).to_string();
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
        tokens.access_token = Some(access);
        if let Some(refresh) = pick(&["refresh", "refresh_token"]) {
            tokens.refresh_token = Some(refresh);
        }
        tokens.access_expires_at = pick(&["access_expires_at", "expires_at"]);
        if let Some(at) = pick(&["refresh_expires_at"]) {
            tokens.refresh_expires_at = Some(at);
        }
        Ok(())
    }
}

fn refresh_failed(why: &str) -> Error {
    Error::auth_refused(
        format!("the Teamspace access token could not be refreshed: {why}"),
        "log in again with spec-kitty (`spec-kitty auth login`), then run `kitty-sync now`",
    )
}

fn unsaved_tokens(path: &std::path::Path, cause: &Error) -> Error {
    Error::internal(
        format!(
            "the Teamspace server rotated the tokens, but {} could not be rewritten ({cause}); the new tokens were used for this run only",
            path.display()
        ),
        format!(
            "the refresh token left in {} is used up: fix the file, then log in again with spec-kitty (`spec-kitty auth login`)",
            path.display()
        ),
    )
}

/// Rewrites the `[tokens]` of `credentials` atomically with mode 0600, keeping everything else.
/// A file that no longer parses is left alone.
fn save_tokens(path: &std::path::Path, c: &Credentials) -> Result<()> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io("cannot read", path, e))?;
    let mut doc = text.parse::<toml_edit::DocumentMut>().map_err(|e| {
        Error::usage(
            format!("{} no longer parses as TOML ({})", path.display(), e.message().trim()),
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
        let gates = TeamspaceGates::evaluate(Some(&self.credentials), Some(&self.identity.team_slug));
        let credentials_path = self.home.credentials_path();
        vec![
            Gate {
                reason: "saas_disabled",
                satisfied: gates.saas_enabled,
                message: "Teamspace delivery is disabled (SPEC_KITTY_ENABLE_SAAS_SYNC is not on)".into(),
                hint: "export SPEC_KITTY_ENABLE_SAAS_SYNC=1, or deliver elsewhere with `kitty-sync mode external-receiver --endpoint URL`".into(),
            },
            Gate {
                reason: "missing_auth",
                satisfied: gates.auth_present,
                message: match &self.unreadable {
                    Some(why) => format!("no usable Teamspace access token: {why}"),
                    None => format!("no usable Teamspace access token in {}", credentials_path.display()),
                },
                hint: "log in with spec-kitty (`spec-kitty auth login`) so [tokens] access is present".into(),
            },
            Gate {
                reason: "missing_team",
                satisfied: gates.team_known,
                message: format!("no team in {} ([user] team_slug)", credentials_path.display()),
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
            // Nothing to refresh with: the first post's 401 then stops the drain.
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
        if self.refreshed {
            return Ok(false);
        }
        self.refresh()
    }

    fn health(&mut self) -> Option<DeploymentMetadata> {
        health_metadata(&self.client, &self.server)
    }

    fn finish(&mut self) -> Result<()> {
        self.unsaved.take().map_or(Ok(()), Err)
    }
}

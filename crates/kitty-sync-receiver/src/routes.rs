//! HTTP routes. Handlers stay thin: authentication, fault injection and body limits here,
//! the batch protocol in [`crate::batch`], storage behind [`ReceiverStore`].

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, Query, Request, State};
use axum::http::header::{AUTHORIZATION, CONNECTION, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use jiff::Timestamp;
use serde::Serialize;
use serde_json::value::RawValue;
use tokio::sync::Semaphore;

use crate::batch::{self, Failure, Rules};
use crate::body::{self, DecodeError, ReadError};
use crate::config::ServerConfig;
use crate::connections::Activity;
use crate::store::{AnyStore, BatchRecord, StoredEvent};

/// `GET /api/v1/events/` page size when `limit` is absent, and the most it will return.
pub const DEFAULT_LIST_LIMIT: usize = 100;
pub const MAX_LIST_LIMIT: usize = 1000;

pub(crate) struct AppState {
    pub store: AnyStore,
    pub config: ServerConfig,
    /// Batch requests seen after authentication, for `--fail-every`.
    pub batches: AtomicU64,
    /// Bounds how many batch bodies are held and processed at once, so memory stays flat
    /// however many clients connect; the others wait with their bodies read.
    pub batch_slots: Semaphore,
    /// Bounds the bytes of all bodies being read at once (see [`body::reading_budget`]).
    pub reading_budget: Arc<Semaphore>,
}

/// Batches processed at once: enough to keep the cores busy parsing while one commits.
pub(crate) fn batch_slots() -> Semaphore {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    Semaphore::new((cores * 2).max(4))
}

pub(crate) fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/api/v1/events/batch/", post(post_batch))
        .route("/api/v1/events/batch", post(post_batch))
        .route("/api/v1/sync/health/", get(health))
        .route("/api/v1/sync/health", get(health))
        .route("/api/v1/events/", get(list_events))
        .route("/api/v1/events", get(list_events))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // Bodies are streamed under our own limits (see `body`), never buffered by axum.
        .layer(DefaultBodyLimit::disable())
        .layer(middleware::from_fn_with_state(state.clone(), delay_responses))
        .with_state(state)
}

async fn post_batch(
    State(state): State<Arc<AppState>>,
    activity: Option<Extension<Arc<Activity>>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let received_at = Timestamp::now();
    let activity = activity.map(|Extension(activity)| activity);
    match accept_batch(&state, activity.as_deref(), &headers, body, received_at).await {
        Ok(json) => json_response(StatusCode::OK, json),
        Err(failure) => {
            record_failure(&state, &failure, received_at).await;
            failure_response(&failure)
        }
    }
}

async fn accept_batch(
    state: &Arc<AppState>,
    activity: Option<&Activity>,
    headers: &HeaderMap,
    body: Body,
    received_at: Timestamp,
) -> Result<Vec<u8>, Failure> {
    // Early refusals still read the body (bounded), so the client gets the status instead
    // of a reset connection.
    let refusal = authorize(&state.config, headers).err().or_else(|| injected_failure(state));
    if let Some(failure) = refusal {
        body::drain(body).await;
        return Err(failure);
    }
    let encoding = match body::encoding(headers) {
        Ok(encoding) => encoding,
        Err(value) => {
            body::drain(body).await;
            let error = format!("unsupported Content-Encoding {value:?}: send gzip or identity");
            return Err(Failure::new(415, error));
        }
    };
    let max_body = state.config.max_body_bytes;
    let limit = body::wire_limit(encoding, max_body);
    if body::refuse_before_upload(headers, limit) {
        return Err(body_too_large(max_body));
    }
    let limits = &state.config.connections;
    let pace = body::Pace { pause: limits.body_timeout, min_rate: limits.min_body_rate };
    // The body is read before a batch slot is taken: a slow client then holds only the
    // bytes it sent, never a slot that honest batches wait for.
    let collected = body::collect(headers, body, limit, pace, &state.reading_budget).await.map_err(|e| match e {
        ReadError::TooLarge => body_too_large(max_body),
        ReadError::Transport(text) => Failure::new(400, format!("cannot read the request body: {text}")),
        ReadError::TooSlow(text) => Failure::new(408, text),
        ReadError::Busy => busy("the receiver is reading too many request bodies at once, retry later"),
    })?;
    if let Some(activity) = activity {
        activity.body_received();
    }
    // Only fails once the semaphore is closed, which this server never does.
    let _slot = state.batch_slots.acquire().await.map_err(|_| busy("the receiver is shutting down"))?;
    let judging = Arc::clone(state);
    // Decompressing and parsing are CPU work: off the async threads.
    let work = move || {
        let json = body::decode(encoding, collected.bytes, max_body).map_err(|e| match e {
            DecodeError::TooLarge => body_too_large(max_body),
            DecodeError::Malformed(text) => Failure::new(400, text),
        })?;
        let config = &judging.config;
        let rules = Rules { max_event_bytes: config.max_event_bytes, reject_types: &config.faults.reject_types };
        batch::judge_body(&rules, &json, received_at)
    };
    let mut judged = tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Failure::new(500, format!("batch processing failed: {e}")))??;
    let events = std::mem::take(&mut judged.events);
    match state.store.ingest(judged.record.clone(), events).await {
        Ok(ingested) => batch::respond(judged, ingested),
        Err(e) => Err(batch::ingest_failure(&judged, &e)),
    }
}

fn busy(error: &str) -> Failure {
    Failure { retry_after: true, ..Failure::new(503, error) }
}

fn body_too_large(max_body: usize) -> Failure {
    Failure::new(413, format!("request body too large: over {max_body} bytes after decompression (--max-body-bytes)"))
}

fn authorize(config: &ServerConfig, headers: &HeaderMap) -> Result<(), Failure> {
    let Some(token) = &config.token else { return Ok(()) };
    match headers.get(AUTHORIZATION).and_then(bearer) {
        Some(presented) if token.matches(presented) => Ok(()),
        Some(_) => Err(Failure::new(401, "invalid bearer token")),
        None => Err(Failure::new(401, "missing bearer token: send Authorization: Bearer <token>")),
    }
}

fn bearer(value: &HeaderValue) -> Option<&[u8]> {
    let text = value.as_bytes();
    let space = text.iter().position(|b| *b == b' ')?;
    let (scheme, rest) = text.split_at(space);
    scheme.eq_ignore_ascii_case(b"bearer").then(|| rest.trim_ascii())
}

fn injected_failure(state: &AppState) -> Option<Failure> {
    let faults = &state.config.faults;
    let every = faults.fail_every?;
    let number = state.batches.fetch_add(1, Ordering::Relaxed) + 1;
    if !number.is_multiple_of(every.get()) {
        return None;
    }
    let status = faults.fail_status;
    let error = format!("injected failure: batch request #{number} (--fail-every {every}, --fail-status {status})");
    Some(Failure { retry_after: matches!(status, 429 | 503), ..Failure::new(status, error) })
}

async fn record_failure(state: &Arc<AppState>, failure: &Failure, received_at: Timestamp) {
    let record = BatchRecord {
        received_at,
        http_status: failure.status,
        event_count: failure.event_count,
        rejected: 0,
        error: Some(failure.error.clone()),
    };
    // The answer to the client does not depend on the audit row; an operator should still
    // learn that the database refused a write.
    if let Err(e) = state.store.record_request(record).await {
        eprintln!("kitty-sync receiver: cannot record a batch request: {e}");
    }
}

fn failure_response(failure: &Failure) -> Response {
    let status = StatusCode::from_u16(failure.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = json_response(status, failure.body().to_string().into_bytes());
    let headers = response.headers_mut();
    if failure.retry_after {
        headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
    }
    if status == StatusCode::UNAUTHORIZED {
        headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    if status == StatusCode::REQUEST_TIMEOUT {
        // The rest of a too-slow body is never read, so the connection cannot carry another request.
        headers.insert(CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

async fn health(State(state): State<Arc<AppState>>) -> Response {
    let deployment = &state.config.deployment;
    let server_instance_id = match state.store.server_instance_id().await {
        Ok(id) => id,
        Err(e) => return failure_response(&batch::store_failure(&e)),
    };
    let body = serde_json::json!({
        "status": "ok",
        "server_instance_id": server_instance_id,
        "deployment_id": deployment.deployment_id,
        "environment_name": deployment.environment_name,
        "git_sha": deployment.git_sha,
    });
    json_response(StatusCode::OK, body.to_string().into_bytes())
}

#[derive(Serialize)]
struct Listed {
    seq: i64,
    event_id: String,
    received_at: String,
    envelope: Box<RawValue>,
}

#[derive(Serialize)]
struct Listing {
    events: Vec<Listed>,
    /// The last `seq` returned, or the `after` that was asked for when the page is empty, so
    /// a client can always pass it back as the next `after`.
    next_after: i64,
}

async fn list_events(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Response {
    if let Err(failure) = authorize(&state.config, &headers) {
        return failure_response(&failure);
    }
    let (after, limit) = match query.map_err(|e| e.body_text()).and_then(|Query(q)| page(&q)) {
        Ok(page) => page,
        Err(error) => return failure_response(&Failure::new(400, error)),
    };
    let events = match state.store.events_after(after, limit).await {
        Ok(events) => events,
        Err(e) => return failure_response(&batch::store_failure(&e)),
    };
    let next_after = events.last().map_or(after, |e| e.seq);
    let listing = Listing { events: events.into_iter().map(listed).collect(), next_after };
    match serde_json::to_vec(&listing) {
        Ok(json) => json_response(StatusCode::OK, json),
        Err(e) => failure_response(&Failure::new(500, format!("cannot encode the listing: {e}"))),
    }
}

fn listed(event: StoredEvent) -> Listed {
    let envelope = event.envelope_json();
    Listed { seq: event.seq, event_id: event.event_id, received_at: event.received_at, envelope }
}

/// `after` defaults to 0 and must be ≥ 0; `limit` defaults to [`DEFAULT_LIST_LIMIT`], must be
/// ≥ 1, and is capped at [`MAX_LIST_LIMIT`].
fn page(query: &HashMap<String, String>) -> Result<(i64, usize), String> {
    let after = match query.get("after") {
        None => 0,
        Some(text) => match text.trim().parse::<i64>() {
            Ok(n) if n >= 0 => n,
            _ => return Err(format!("invalid after={text:?}: expected a sequence number >= 0")),
        },
    };
    let limit = match query.get("limit") {
        None => DEFAULT_LIST_LIMIT,
        Some(text) => match text.trim().parse::<usize>() {
            Ok(n) if n >= 1 => n.min(MAX_LIST_LIMIT),
            _ => return Err(format!("invalid limit={text:?}: expected an integer >= 1")),
        },
    };
    Ok((after, limit))
}

async fn not_found(method: Method, uri: Uri) -> Response {
    let error = format!("no such endpoint: {method} {}", uri.path());
    failure_response(&Failure::new(404, error))
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    let error = format!("method {method} is not allowed on {}", uri.path());
    failure_response(&Failure::new(405, error))
}

/// `--delay-ms`: the work is done (and committed) first, then the answer waits, which is
/// what a slow network or a client timeout after a commit looks like.
async fn delay_responses(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let delay = state.config.faults.delay;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    response
}

fn json_response(status: StatusCode, json: Vec<u8>) -> Response {
    (status, [(CONTENT_TYPE, HeaderValue::from_static("application/json"))], json).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paging_rules() {
        let q = |pairs: &[(&str, &str)]| {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<HashMap<_, _>>()
        };
        assert_eq!(page(&q(&[])), Ok((0, DEFAULT_LIST_LIMIT)));
        assert_eq!(page(&q(&[("after", "7"), ("limit", "5000")])), Ok((7, MAX_LIST_LIMIT)));
        assert!(page(&q(&[("after", "-1")])).is_err());
        assert!(page(&q(&[("limit", "0")])).is_err());
        assert!(page(&q(&[("limit", "x")])).is_err());
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer(&HeaderValue::from_static("bearer  abc")), Some(&b"abc"[..]));
        assert_eq!(bearer(&HeaderValue::from_static("Basic abc")), None);
        assert_eq!(bearer(&HeaderValue::from_static("Bearer")), None);
    }
}

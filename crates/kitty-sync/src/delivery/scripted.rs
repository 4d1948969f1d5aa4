//! In-process test doubles for the dispatcher: a receiver that answers from a script and
//! remembers what it acknowledged, and a pacer whose sleeps only advance a fake clock.

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

use super::backoff::{Pacer, RetryAfter};
use super::batch::decode_batch;
use super::receiver::{Gate, Receiver, TransportError};
use super::target::{DeploymentMetadata, TargetIdentity, TargetKind};
use super::wire::HttpReply;
use crate::error::Result;

/// Per-event answer codes of [`Reply::PerEvent`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventAnswer {
    Success,
    Duplicate,
    Pending,
    Rejected,
    /// The event is missing from `results`.
    Omitted,
}

/// One scripted answer to one POST.
#[derive(Debug, Clone)]
pub enum Reply {
    /// 200 with per-event statuses, `answers[i % len]` for the i-th event of the batch.
    PerEvent(Vec<EventAnswer>),
    /// A bare status (413, 5xx, 429, 401, other 4xx), optionally with `Retry-After`.
    Status(u16, Option<RetryAfter>),
    /// 400 with details naming the first event of the batch.
    BadRequestNamingFirst,
    /// 400 without usable details.
    BadRequestNoDetails,
    /// No answer at all (connection refused, timeout).
    Transport,
}

pub struct ScriptedReceiver {
    identity: TargetIdentity,
    script: VecDeque<Reply>,
    /// Event ids this receiver answered `success` or `duplicate` for.
    pub acknowledged: HashSet<String>,
    pub posts: usize,
}

impl ScriptedReceiver {
    pub fn new(script: impl IntoIterator<Item = Reply>) -> ScriptedReceiver {
        ScriptedReceiver::at("http://127.0.0.1:9/api/v1/events/batch", script)
    }

    /// A receiver that is its own target (canonical URL `url`).
    pub fn at(url: &str, script: impl IntoIterator<Item = Reply>) -> ScriptedReceiver {
        ScriptedReceiver {
            identity: TargetIdentity {
                kind: TargetKind::External,
                canonical_url: url.into(),
                team_slug: String::new(),
                user_email: String::new(),
            },
            script: script.into_iter().collect(),
            acknowledged: HashSet::new(),
            posts: 0,
        }
    }

    /// Once the script is used up, every event is accepted.
    fn next_reply(&mut self) -> Reply {
        self.script.pop_front().unwrap_or(Reply::PerEvent(vec![EventAnswer::Success]))
    }

    fn answer(&mut self, ids: &[String]) -> std::result::Result<HttpReply, TransportError> {
        let reply = match self.next_reply() {
            Reply::Transport => return Err(TransportError("scripted: connection refused".into())),
            Reply::PerEvent(answers) => self.per_event(ids, &answers),
            Reply::Status(status, retry_after) => HttpReply {
                status,
                body: json!({"error": format!("scripted {status}")}).to_string().into_bytes(),
                retry_after,
            },
            Reply::BadRequestNamingFirst => {
                let details = json!([{"event_id": ids[0], "detail": "scripted: invalid"}]);
                HttpReply::json(400, &json!({"error": "invalid", "details": details}))
            }
            Reply::BadRequestNoDetails => HttpReply::json(400, &json!({"error": "invalid"})),
        };
        Ok(reply)
    }

    fn per_event(&mut self, ids: &[String], answers: &[EventAnswer]) -> HttpReply {
        let mut results = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            let answer = answers.get(i % answers.len().max(1)).copied().unwrap_or(EventAnswer::Success);
            let status = match answer {
                EventAnswer::Success => "success",
                EventAnswer::Duplicate => "duplicate",
                EventAnswer::Pending => "pending",
                EventAnswer::Rejected => "rejected",
                EventAnswer::Omitted => continue,
            };
            if matches!(answer, EventAnswer::Success | EventAnswer::Duplicate) {
                self.acknowledged.insert(id.clone());
            }
            results.push(json!({"event_id": id, "status": status, "error": "scripted"}));
        }
        HttpReply::json(200, &json!({ "results": results }))
    }
}

impl Receiver for ScriptedReceiver {
    fn identity(&self) -> &TargetIdentity {
        &self.identity
    }

    fn batch_url(&self) -> &str {
        &self.identity.canonical_url
    }

    fn gates(&self) -> Vec<Gate> {
        Vec::new()
    }

    fn team(&self) -> Option<&str> {
        None
    }

    fn prepare(&mut self) -> Result<()> {
        Ok(())
    }

    fn post_batch(&mut self, gzip_body: &[u8]) -> std::result::Result<HttpReply, TransportError> {
        self.posts += 1;
        let body = decode_batch(gzip_body).map_err(|e| TransportError(e.to_string()))?;
        let parsed: Value = serde_json::from_slice(&body).map_err(|e| TransportError(e.to_string()))?;
        let ids: Vec<String> = parsed["events"]
            .as_array()
            .map(|events| events.iter().filter_map(|e| e["event_id"].as_str().map(str::to_string)).collect())
            .unwrap_or_default();
        self.answer(&ids)
    }

    fn renew_auth(&mut self) -> Result<bool> {
        Ok(false)
    }

    fn health(&mut self) -> Option<DeploymentMetadata> {
        None
    }
}

/// A clock that only moves when the dispatcher sleeps; every sleep is recorded.
pub struct FakePacer {
    pub now: SystemTime,
    pub sleeps: Vec<Duration>,
}

impl FakePacer {
    pub fn new() -> FakePacer {
        FakePacer { now: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000), sleeps: Vec::new() }
    }
}

impl Pacer for FakePacer {
    fn now(&self) -> SystemTime {
        self.now
    }

    fn sleep(&mut self, duration: Duration) {
        self.sleeps.push(duration);
        self.now += duration;
    }

    fn jitter(&mut self) -> f64 {
        0.5
    }
}

//! What the server is told at startup. Validated by the caller (the CLI) into plain values.

use std::collections::BTreeSet;
use std::fmt;
use std::num::NonZeroU64;
use std::time::Duration;

/// Default cap on a request body after decompression.
pub const DEFAULT_MAX_BODY_BYTES: usize = 8 * 1024 * 1024;
/// Default cap on one event's serialized size. Generous next to the ~1 KB envelopes
/// spec-kitty emits, small enough that one event can never eat a whole 8 MiB batch.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 1024 * 1024;
/// Default status of an injected failure (`--fail-every`).
pub const DEFAULT_FAIL_STATUS: u16 = 503;
/// How long a shutdown waits for in-flight requests before it gives up on them.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Default bound on open connections; past it the longest-idle connection makes room.
pub const DEFAULT_MAX_CONNECTIONS: usize = 512;
/// Default time a connection has to deliver a complete request head, counted from its
/// opening or from its previous answer (so it also closes idle keep-alive connections).
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Default longest pause while a request body arrives, and the grace before the minimum
/// rate applies.
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// Default slowest average rate (bytes per second) at which a body may arrive once the
/// grace period has passed: a 8 MiB body may take over two hours, a trickle of a few bytes
/// a second is cut off.
pub const DEFAULT_MIN_BODY_RATE: u64 = 1024;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Limit on the decompressed body; larger bodies are answered 413.
    pub max_body_bytes: usize,
    /// Limit on one event's serialized size (as received).
    pub max_event_bytes: usize,
    /// When set, batch and listing requests need `Authorization: Bearer <token>`.
    pub token: Option<BearerToken>,
    pub deployment: Deployment,
    pub faults: Faults,
    pub shutdown_grace: Duration,
    pub connections: ConnectionLimits,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_event_bytes: DEFAULT_MAX_EVENT_BYTES,
            token: None,
            deployment: Deployment::default(),
            faults: Faults::default(),
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            connections: ConnectionLimits::default(),
        }
    }
}

/// Bounds that keep slow, idle or endless clients from starving honest ones.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// Open connections at most. A new connection past it closes the longest-idle one (or
    /// one stuck longest in sending its body); when every connection is working it is
    /// answered 503 with `Retry-After`.
    pub max_connections: usize,
    /// See [`DEFAULT_HEADER_TIMEOUT`].
    pub header_timeout: Duration,
    /// See [`DEFAULT_BODY_TIMEOUT`].
    pub body_timeout: Duration,
    /// See [`DEFAULT_MIN_BODY_RATE`]; 0 turns the rate check off (the pause limit stays).
    pub min_body_rate: u64,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            body_timeout: DEFAULT_BODY_TIMEOUT,
            min_body_rate: DEFAULT_MIN_BODY_RATE,
        }
    }
}

/// Identity fields reported by the health endpoint; `None` is reported as `null`.
#[derive(Debug, Clone, Default)]
pub struct Deployment {
    pub deployment_id: Option<String>,
    pub environment_name: Option<String>,
    pub git_sha: Option<String>,
}

/// Fault injection for testing clients; everything off by default.
#[derive(Debug, Clone)]
pub struct Faults {
    /// Batch requests number N, 2N, 3N… (counted from 1, after authentication) fail.
    pub fail_every: Option<NonZeroU64>,
    /// Status of an injected failure. 429 and 503 carry `Retry-After: 1`.
    pub fail_status: u16,
    /// Events of these types are answered `rejected`.
    pub reject_types: BTreeSet<String>,
    /// Sleep before every response (after the work is done and committed).
    pub delay: Duration,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            fail_every: None,
            fail_status: DEFAULT_FAIL_STATUS,
            reject_types: BTreeSet::new(),
            delay: Duration::ZERO,
        }
    }
}

/// A bearer token that never shows itself in `Debug` output or logs.
#[derive(Clone)]
pub struct BearerToken(String);

impl BearerToken {
    pub fn new(token: impl Into<String>) -> Self {
        BearerToken(token.into())
    }

    /// Constant-time comparison, so response timing does not leak the token.
    pub(crate) fn matches(&self, candidate: &[u8]) -> bool {
        let expected = self.0.as_bytes();
        if expected.len() != candidate.len() {
            return false;
        }
        expected.iter().zip(candidate).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BearerToken(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_is_redacted_and_compared_exactly() {
        let token = BearerToken::new("s3cret");
        assert!(!format!("{token:?}").contains("s3cret"));
        assert!(token.matches(b"s3cret"));
        assert!(!token.matches(b"s3cre"));
        assert!(!token.matches(b"s3creT"));
    }
}

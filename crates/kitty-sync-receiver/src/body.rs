//! Reading request bodies under hard limits: the wire bytes are counted while they stream in,
//! and gzip is inflated with a cap on its output, so neither a huge upload nor a gzip bomb is
//! ever held in memory.

use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::HeaderMap;
use axum::http::header::{CONTENT_ENCODING, CONTENT_LENGTH, EXPECT};
use flate2::read::MultiGzDecoder;
use http_body_util::BodyExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// After answering 413 we keep reading (and discarding) this much of the rest of the body, so
/// the client sees our answer instead of a connection reset caused by unread data.
const DRAIN_MAX_BYTES: u64 = 256 * 1024 * 1024;
const DRAIN_MAX_TIME: Duration = Duration::from_secs(10);
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Encoding {
    Identity,
    Gzip,
}

#[derive(Debug)]
pub(crate) enum ReadError {
    /// More wire bytes than `limit`.
    TooLarge,
    /// The connection failed while the body was being read.
    Transport(String),
    /// The body arrived slower than [`Pace`] allows.
    TooSlow(String),
    /// Bodies being read at once already hold the whole reading budget.
    Busy,
}

#[derive(Debug)]
pub(crate) enum DecodeError {
    /// More than `limit` bytes after decompression.
    TooLarge,
    Malformed(String),
}

/// The body's encoding from `Content-Encoding`; `Err` holds the unsupported value.
pub(crate) fn encoding(headers: &HeaderMap) -> Result<Encoding, String> {
    let Some(value) = headers.get(CONTENT_ENCODING) else {
        return Ok(Encoding::Identity);
    };
    let text = value.to_str().map_err(|_| "<non-ASCII>".to_string())?.trim();
    if text.eq_ignore_ascii_case("gzip") || text.eq_ignore_ascii_case("x-gzip") {
        Ok(Encoding::Gzip)
    } else if text.is_empty() || text.eq_ignore_ascii_case("identity") {
        Ok(Encoding::Identity)
    } else {
        Err(text.to_string())
    }
}

/// How many wire bytes may arrive for at most `max_body` decompressed bytes. Deflate never
/// expands data by more than ~5 bytes per 64 KiB block plus headers, so a gzip body longer
/// than this cannot inflate to `max_body` or less.
pub(crate) fn wire_limit(encoding: Encoding, max_body: usize) -> usize {
    match encoding {
        Encoding::Identity => max_body,
        Encoding::Gzip => max_body.saturating_add(max_body / 256).saturating_add(4096),
    }
}

fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

/// True when the client announced more than `limit` bytes and waits for `100 Continue`
/// before sending them: answering right away saves the upload altogether.
pub(crate) fn refuse_before_upload(headers: &HeaderMap, limit: usize) -> bool {
    let expects_continue = headers
        .get(EXPECT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("100-continue"));
    expects_continue && declared_length(headers).is_some_and(|n| n > limit as u64)
}

/// How fast a body must arrive: no pause longer than `pause`, and once `pause` has passed
/// since the first byte was due, at least `min_rate` bytes per second on average (0: no
/// rate bound). Slow or stalled uploads end instead of holding memory and a connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pace {
    pub pause: Duration,
    pub min_rate: u64,
}

impl Pace {
    /// When more bytes must have arrived, given when reading began, the last progress and
    /// the bytes received so far.
    fn next_deadline(&self, start: Instant, last_progress: Instant, received: u64) -> Instant {
        let by_pause = last_progress + self.pause;
        if self.min_rate == 0 {
            return by_pause;
        }
        let allowed = Duration::from_secs_f64((received + 1) as f64 / self.min_rate as f64);
        by_pause.min(start + self.pause + allowed.min(Duration::from_secs(86_400)))
    }
}

/// A read body and its share of the reading budget, held until the body is processed.
pub(crate) struct Collected {
    pub bytes: Vec<u8>,
    _budget: Option<OwnedSemaphorePermit>,
}

/// How long a reader waits for room in an exhausted reading budget before answering 503.
const BUDGET_WAIT: Duration = Duration::from_secs(1);

/// Bytes that all bodies being read at once may hold together, counted in KiB permits.
pub(crate) fn reading_budget(max_body: usize) -> Semaphore {
    let bytes = wire_limit(Encoding::Gzip, max_body).saturating_mul(4).max(64 * 1024 * 1024);
    Semaphore::new((bytes / 1024).min(Semaphore::MAX_PERMITS))
}

/// Collects at most `limit` bytes, arriving at `pace`, each chunk paid for from `budget`.
/// Over the limit, the rest is drained (bounded) and dropped.
pub(crate) async fn collect(
    headers: &HeaderMap,
    mut body: Body,
    limit: usize,
    pace: Pace,
    budget: &Arc<Semaphore>,
) -> Result<Collected, ReadError> {
    if declared_length(headers).is_some_and(|n| n > limit as u64) {
        drain(body).await;
        return Err(ReadError::TooLarge);
    }
    let capacity = declared_length(headers).map_or(64 * 1024, |n| n as usize).min(limit).min(1024 * 1024);
    let mut buffer = Vec::with_capacity(capacity);
    let mut held: Option<OwnedSemaphorePermit> = None;
    let start = Instant::now();
    let mut last_progress = start;
    loop {
        let deadline = pace.next_deadline(start, last_progress, buffer.len() as u64);
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(frame)) => frame.map_err(|e| ReadError::Transport(e.to_string()))?,
            Ok(None) => break,
            Err(_) => return Err(too_slow(&pace, buffer.len(), start)),
        };
        let Ok(data) = frame.into_data() else { continue };
        if buffer.len() + data.len() > limit {
            drain(body).await;
            return Err(ReadError::TooLarge);
        }
        reserve(budget, &mut held, buffer.len() + data.len()).await?;
        buffer.extend_from_slice(&data);
        last_progress = Instant::now();
    }
    Ok(Collected { bytes: buffer, _budget: held })
}

fn too_slow(pace: &Pace, received: usize, start: Instant) -> ReadError {
    let waited = start.elapsed().as_secs();
    ReadError::TooSlow(format!(
        "request body arrived too slowly: {received} bytes in {waited} s (a pause over {} s, or under {} bytes/s)",
        pace.pause.as_secs(),
        pace.min_rate
    ))
}

/// Grows the permit held for this body to cover `total` bytes.
async fn reserve(
    budget: &Arc<Semaphore>,
    held: &mut Option<OwnedSemaphorePermit>,
    total: usize,
) -> Result<(), ReadError> {
    let needed = total.div_ceil(1024);
    let have = held.as_ref().map_or(0, OwnedSemaphorePermit::num_permits);
    if needed <= have {
        return Ok(());
    }
    let more = u32::try_from(needed - have).map_err(|_| ReadError::TooLarge)?;
    let permit = tokio::time::timeout(BUDGET_WAIT, Arc::clone(budget).acquire_many_owned(more))
        .await
        .map_err(|_| ReadError::Busy)?
        .map_err(|_| ReadError::Busy)?;
    match held {
        Some(existing) => existing.merge(permit),
        None => *held = Some(permit),
    }
    Ok(())
}

/// Reads and discards what is left of a body, within [`DRAIN_MAX_BYTES`] and
/// [`DRAIN_MAX_TIME`]; past either bound the connection is simply closed.
pub(crate) async fn drain(mut body: Body) {
    let discard = async {
        let mut seen: u64 = 0;
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(data) = frame.into_data() {
                seen += data.len() as u64;
                if seen > DRAIN_MAX_BYTES {
                    break;
                }
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_MAX_TIME, discard).await;
}

/// The body as JSON bytes. Gzip is recognised by header or, for clients that forget the
/// header, by its magic number (a JSON text can never start with byte 0x1f).
pub(crate) fn decode(encoding: Encoding, wire: Vec<u8>, max_body: usize) -> Result<Vec<u8>, DecodeError> {
    let gzip = encoding == Encoding::Gzip || wire.starts_with(&GZIP_MAGIC);
    if !gzip {
        return if wire.len() > max_body { Err(DecodeError::TooLarge) } else { Ok(wire) };
    }
    gunzip(&wire, max_body)
}

fn gunzip(wire: &[u8], max_body: usize) -> Result<Vec<u8>, DecodeError> {
    let cap = max_body as u64 + 1;
    let mut inflated = Vec::with_capacity(wire.len().saturating_mul(4).min(max_body + 1));
    MultiGzDecoder::new(wire)
        .take(cap)
        .read_to_end(&mut inflated)
        .map_err(|e| DecodeError::Malformed(format!("malformed gzip body: {e}")))?;
    if inflated.len() > max_body {
        return Err(DecodeError::TooLarge);
    }
    Ok(inflated)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::Compression;
    use flate2::write::GzEncoder;
    use std::io::Write;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
        encoder.write_all(data).unwrap();
        encoder.finish().unwrap()
    }

    #[test]
    fn gzip_bomb_stops_at_the_limit() {
        let bomb = gzip(&vec![b' '; 50 * 1024 * 1024]);
        assert!(bomb.len() < 100 * 1024);
        assert!(matches!(decode(Encoding::Gzip, bomb, 1024 * 1024), Err(DecodeError::TooLarge)));
    }

    #[test]
    fn truncated_gzip_is_malformed() {
        let mut data = gzip(b"{\"events\": []}");
        data.truncate(data.len() - 5);
        match decode(Encoding::Gzip, data, 1024) {
            Err(DecodeError::Malformed(text)) => assert!(text.starts_with("malformed gzip body")),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn gzip_is_sniffed_without_a_header_and_limits_are_exact() {
        let body = b"{\"events\": []}";
        assert_eq!(decode(Encoding::Identity, gzip(body), body.len()).unwrap(), body);
        assert!(matches!(decode(Encoding::Gzip, gzip(body), body.len() - 1), Err(DecodeError::TooLarge)));
        assert!(matches!(decode(Encoding::Identity, body.to_vec(), body.len() - 1), Err(DecodeError::TooLarge)));
    }

    #[test]
    fn encodings() {
        let mut headers = HeaderMap::new();
        assert_eq!(encoding(&headers), Ok(Encoding::Identity));
        headers.insert(CONTENT_ENCODING, "GZip".parse().unwrap());
        assert_eq!(encoding(&headers), Ok(Encoding::Gzip));
        headers.insert(CONTENT_ENCODING, "br".parse().unwrap());
        assert_eq!(encoding(&headers), Err("br".to_string()));
    }
}

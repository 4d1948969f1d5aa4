//! Reading request bodies under hard limits: the wire bytes are counted while they stream in,
//! and gzip is inflated with a cap on its output, so neither a huge upload nor a gzip bomb is
//! ever held in memory.

use std::io::Read;
use std::time::Duration;

use axum::body::Body;
use axum::http::HeaderMap;
use axum::http::header::{CONTENT_ENCODING, CONTENT_LENGTH, EXPECT};
use flate2::read::MultiGzDecoder;
use http_body_util::BodyExt;

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

/// Collects at most `limit` bytes. Over the limit, the rest is drained (bounded) and dropped.
pub(crate) async fn collect(headers: &HeaderMap, mut body: Body, limit: usize) -> Result<Vec<u8>, ReadError> {
    if declared_length(headers).is_some_and(|n| n > limit as u64) {
        drain(body).await;
        return Err(ReadError::TooLarge);
    }
    let capacity = declared_length(headers).map_or(64 * 1024, |n| n as usize).min(limit);
    let mut buffer = Vec::with_capacity(capacity);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ReadError::Transport(e.to_string()))?;
        let Ok(data) = frame.into_data() else { continue };
        if buffer.len() + data.len() > limit {
            drain(body).await;
            return Err(ReadError::TooLarge);
        }
        buffer.extend_from_slice(&data);
    }
    Ok(buffer)
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

//! `--health-bind`: `GET /health` answers the daemon state document, 200 when every target is
//! idle or delivering, 503 otherwise. A few lines of HTTP/1.1 on std, one connection at a time:
//! health checks are rare and tiny, and the engine stays free of an async runtime.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use super::Shared;

const MAX_REQUEST_HEAD: usize = 8 * 1024;

/// Serves until the process ends.
pub fn serve(listener: TcpListener, shared: Arc<Shared>) {
    for stream in listener.incoming().flatten() {
        let _ = answer(stream, &shared);
    }
}

fn answer(mut stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    // A client that never finishes its request must not hold the responder.
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    let head = read_head(&mut stream)?;
    let request_line = head.lines().next().unwrap_or_default();
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    let (status, body) = match (method, path.split('?').next().unwrap_or_default()) {
        ("GET", "/health") => {
            let state = shared.snapshot();
            let body = serde_json::to_vec_pretty(&state).unwrap_or_default();
            if state.healthy() { ("200 OK", body) } else { ("503 Service Unavailable", body) }
        }
        (_, "/health") => ("405 Method Not Allowed", br#"{"error":"use GET"}"#.to_vec()),
        _ => ("404 Not Found", br#"{"error":"not found; try GET /health"}"#.to_vec()),
    };
    let header = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(header.as_bytes())?;
    stream.write_all(&body)?;
    stream.flush()
}

fn read_head(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut head = Vec::new();
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST_HEAD {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&chunk[..n]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

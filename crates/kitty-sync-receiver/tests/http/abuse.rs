//! Connection abuse on loopback: slow headers, slow and endless bodies, idle floods. Every
//! abusive client runs a bounded loop and stops by itself; the honest client must keep
//! getting answers within a second throughout.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kitty_sync_receiver::{ConnectionLimits, ServerConfig};

use crate::common::*;

const HONEST_DEADLINE: Duration = Duration::from_secs(1);

fn tight_limits(max_connections: usize) -> ServerConfig {
    let connections = ConnectionLimits {
        max_connections,
        header_timeout: Duration::from_secs(1),
        body_timeout: Duration::from_secs(1),
        min_body_rate: 1024,
    };
    ServerConfig { connections, ..ServerConfig::default() }
}

fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    stream
}

/// Posts one new event and checks it is stored, answered within [`HONEST_DEADLINE`]; a fresh
/// client each time, so no pooled connection is reused.
fn honest_batch(receiver: &Receiver, n: u32) {
    let started = Instant::now();
    let reply = post_json(&receiver.batch_url(), &batch(&[envelope(&ulid(n), "Honest")]));
    let took = started.elapsed();
    assert_eq!(reply.statuses(), ["success"], "honest batch {n}: {}", reply.body);
    assert!(took < HONEST_DEADLINE, "honest batch {n} took {took:?}");
}

fn honest_health(receiver: &Receiver) {
    let started = Instant::now();
    let reply = get(&format!("{}/api/v1/sync/health/", receiver.url()), &[]);
    let took = started.elapsed();
    assert_eq!(reply.status, 200);
    assert!(took < HONEST_DEADLINE, "health took {took:?}");
}

/// Honest batches for `duration`, numbered from `first`; returns how many were sent.
fn keep_posting(receiver: &Receiver, first: u32, duration: Duration) -> u32 {
    let until = Instant::now() + duration;
    let mut n = first;
    while Instant::now() < until {
        honest_batch(receiver, n);
        honest_health(receiver);
        n += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    n - first
}

/// True once the server closed `stream` (EOF or reset), waiting at most `within`.
fn closed_within(stream: &mut TcpStream, within: Duration) -> Option<String> {
    stream.set_read_timeout(Some(within)).unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Some(String::from_utf8_lossy(&seen).to_string()),
            Ok(n) => seen.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return None;
            }
            Err(_) => return Some(String::from_utf8_lossy(&seen).to_string()),
        }
    }
}

fn half_a_body(addr: SocketAddr) -> TcpStream {
    let mut stream = connect(addr);
    let body = batch(&[envelope(&ulid(999_999), "Slow")]);
    let head = format!(
        "POST /api/v1/events/batch/ HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(&body.as_bytes()[..body.len() / 2]).unwrap();
    stream
}

#[test]
fn stalled_bodies_neither_hold_batch_slots_nor_linger() {
    let receiver = Receiver::start(Backend::Sqlite, tight_limits(64));
    // More stalled uploads than there are batch slots on any test machine.
    let mut stalled: Vec<TcpStream> = (0..16).map(|_| half_a_body(receiver.addr())).collect();
    let sent = keep_posting(&receiver, 1, Duration::from_millis(1500));
    assert!(sent > 0);
    for stream in &mut stalled {
        let answer = closed_within(stream, Duration::from_secs(5)).expect("a stalled upload is cut off");
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.contains("arrived too slowly"), "{answer}");
    }
    assert_eq!(receiver.stats().event_count, u64::from(sent), "nothing of the stalled uploads is stored");
}

#[test]
fn a_body_trickling_forever_is_cut_off_by_the_minimum_rate() {
    let receiver = Receiver::start(Backend::Sqlite, tight_limits(64));
    let mut stream = connect(receiver.addr());
    let head = "POST /api/v1/events/batch/ HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n";
    stream.write_all(head.as_bytes()).unwrap();
    let started = Instant::now();
    // One byte every 50 ms never pauses long, but stays far under 1 KiB/s. Bounded: stops
    // after 10 s whatever happens.
    let mut refused = false;
    while started.elapsed() < Duration::from_secs(10) {
        if stream.write_all(b"1\r\n \r\n").is_err() {
            refused = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        if started.elapsed() > Duration::from_secs(3) {
            refused = closed_within(&mut stream, Duration::from_millis(10)).is_some();
            if refused {
                break;
            }
        }
    }
    assert!(refused, "the trickle was never cut off");
    assert!(started.elapsed() < Duration::from_secs(6), "cut off after {:?}", started.elapsed());
    honest_batch(&receiver, 1);
}

#[test]
fn an_endless_fast_body_is_refused_at_the_size_limit() {
    let config = ServerConfig { max_body_bytes: 64 * 1024, ..tight_limits(64) };
    let receiver = Receiver::start(Backend::Sqlite, config);
    let addr = receiver.addr();
    let writer = std::thread::spawn(move || {
        let mut stream = connect(addr);
        let head = "POST /api/v1/events/batch/ HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n";
        stream.write_all(head.as_bytes()).unwrap();
        let chunk = format!("{:x}\r\n{}\r\n", 16 * 1024, " ".repeat(16 * 1024));
        let started = Instant::now();
        // Bounded: 20 s or until the server stops reading.
        while started.elapsed() < Duration::from_secs(20) && stream.write_all(chunk.as_bytes()).is_ok() {}
        started.elapsed()
    });
    keep_posting(&receiver, 1, Duration::from_millis(500));
    let wrote_for = writer.join().unwrap();
    assert!(wrote_for < Duration::from_secs(15), "the endless body was read for {wrote_for:?}");
    let stats = receiver.stats();
    assert!(stats.batch_requests > stats.event_count, "the refused upload is recorded: {stats:?}");
}

#[test]
fn dribbled_headers_are_timed_out() {
    let receiver = Receiver::start(Backend::Sqlite, tight_limits(64));
    let mut stream = connect(receiver.addr());
    let started = Instant::now();
    let mut closed = false;
    // One header byte every 100 ms: never silent, never done. Bounded to 8 s.
    for byte in b"GET /api/v1/sync/health/ HTTP/1.1\r\nx-slow: ".iter().chain([b'a'; 80].iter()) {
        if stream.write_all(&[*byte]).is_err() || started.elapsed() > Duration::from_secs(8) {
            closed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        if started.elapsed() > Duration::from_millis(1500)
            && closed_within(&mut stream, Duration::from_millis(5)).is_some()
        {
            closed = true;
            break;
        }
    }
    assert!(closed && started.elapsed() < Duration::from_secs(4), "closed={closed} after {:?}", started.elapsed());
    honest_health(&receiver);
}

#[test]
fn an_idle_keep_alive_connection_is_closed() {
    let receiver = Receiver::start(Backend::Sqlite, tight_limits(64));
    let mut stream = connect(receiver.addr());
    stream.write_all(b"GET /api/v1/sync/health/ HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    let mut buf = [0u8; 4096];
    let n = stream.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    assert!(closed_within(&mut stream, Duration::from_secs(4)).is_some(), "the idle connection stayed open");
}

/// Opens `count` idle connections and holds them; `opened` counts them as they connect, so a
/// test can start its honest traffic once the flood is complete (on a loaded machine the
/// connects take a while).
fn flood(addr: SocketAddr, count: usize, stop: Arc<AtomicBool>, opened: Arc<AtomicUsize>) -> JoinHandle<usize> {
    std::thread::spawn(move || {
        let mut open = Vec::new();
        for _ in 0..count {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            // A full accept backlog refuses a connect now and then: try again, bounded.
            let stream = (0..50).find_map(|_| {
                TcpStream::connect(addr).ok().or_else(|| {
                    std::thread::sleep(Duration::from_millis(20));
                    None
                })
            });
            if let Some(stream) = stream {
                open.push(stream);
                opened.fetch_add(1, Ordering::Relaxed);
            }
        }
        // Held until the test is done looking, bounded by 20 s.
        let started = Instant::now();
        while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(20));
        }
        open.len()
    })
}

#[test]
fn three_hundred_idle_connections_do_not_stop_honest_clients() {
    for max_connections in [64, ServerConfig::default().connections.max_connections] {
        let receiver = Receiver::start(Backend::Sqlite, tight_limits(max_connections));
        let stop = Arc::new(AtomicBool::new(false));
        let opened = Arc::new(AtomicUsize::new(0));
        let flooder = flood(receiver.addr(), 300, Arc::clone(&stop), Arc::clone(&opened));
        let deadline = Instant::now() + Duration::from_secs(20);
        while opened.load(Ordering::Relaxed) < 300 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        keep_posting(&receiver, 1, Duration::from_millis(800));
        stop.store(true, Ordering::Relaxed);
        assert_eq!(flooder.join().unwrap(), 300);
    }
}

#[test]
fn a_full_server_of_stalled_uploads_still_takes_new_clients() {
    let receiver = Receiver::start(Backend::Sqlite, tight_limits(8));
    let stalled: Vec<TcpStream> = (0..8).map(|_| half_a_body(receiver.addr())).collect();
    std::thread::sleep(Duration::from_millis(100));
    // Each honest connection evicts the longest-stalled upload.
    keep_posting(&receiver, 1, Duration::from_millis(300));
    drop(stalled);
}

#[test]
fn garbage_on_the_wire_never_stops_the_server() {
    let receiver = Receiver::start(Backend::Sqlite, tight_limits(64));
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let starts: [&[u8]; 5] = [
        b"",
        b"POST /api/v1/events/batch/ HTTP/1.1\r\n",
        b"POST /api/v1/events/batch/ HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n",
        b"POST /api/v1/events/batch/ HTTP/1.1\r\ncontent-encoding: gzip\r\ncontent-length: 40\r\n\r\n\x1f\x8b",
        b"GET /api/v1/events/?after=",
    ];
    for round in 0..150 {
        let mut bytes = starts[round % starts.len()].to_vec();
        let len = (next() % 600) as usize;
        bytes.extend((0..len).map(|_| next() as u8));
        let mut stream = connect(receiver.addr());
        let _ = stream.write_all(&bytes);
        // Half the time hang up at once, half the time wait for whatever answer comes.
        if round % 2 == 0 {
            let _ = stream.shutdown(std::net::Shutdown::Write);
            let _ = closed_within(&mut stream, Duration::from_secs(3));
        }
        if round % 25 == 0 {
            honest_health(&receiver);
        }
    }
    honest_batch(&receiver, 1);
}

#[test]
fn a_server_full_of_working_connections_answers_503() {
    let faults = kitty_sync_receiver::Faults { delay: Duration::from_millis(1500), ..Default::default() };
    let receiver = Receiver::start(Backend::Sqlite, ServerConfig { faults, ..tight_limits(2) });
    let url = receiver.batch_url();
    let working: Vec<_> = (0..2u32)
        .map(|n| {
            let url = url.clone();
            std::thread::spawn(move || post_json(&url, &batch(&[envelope(&ulid(n), "Slow")])))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let (status, answer) = raw_exchange(receiver.addr(), b"GET /api/v1/sync/health/ HTTP/1.1\r\nhost: x\r\n\r\n");
    assert!(started.elapsed() < HONEST_DEADLINE);
    assert_eq!(status, 503, "{answer}");
    assert!(answer.to_ascii_lowercase().contains("retry-after: 1"), "{answer}");
    for post in working {
        assert_eq!(post.join().unwrap().statuses(), ["success"], "working connections are never evicted");
    }
}

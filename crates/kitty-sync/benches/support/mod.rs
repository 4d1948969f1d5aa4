//! Timing shared by the benchmarks: wall and CPU time, so numbers taken on a loaded machine
//! still mean something.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub struct Phase {
    pub wall: Duration,
    pub cpu: Duration,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:>9.3?} wall, {:>9.3?} cpu (both threads)", self.wall, self.cpu)
    }
}

/// User + system CPU time of this process so far (Linux `/proc/self/stat`, 100 Hz ticks), so
/// the numbers mean something on a loaded machine too. Zero elsewhere.
pub fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after_name = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or_default();
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Fields after the name start at `state` (field 3): utime is field 14, stime field 15.
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    let ticks = field(11) + field(12);
    Duration::from_millis(ticks * 10)
}

/// A 26-character Crockford id: `prefix` (4 characters) then `n` in base 32, unique per `n`.
pub fn event_id(prefix: &str, n: usize) -> String {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    let mut out = format!("{prefix:0<16}").into_bytes();
    let mut v = n;
    let mut tail = [b'0'; 10];
    for slot in tail.iter_mut().rev() {
        *slot = ALPHABET[v % 32];
        v /= 32;
    }
    out.truncate(16);
    out.extend_from_slice(&tail);
    String::from_utf8_lossy(&out).into_owned()
}

/// A temporary home filled by `generate`, and how long that took.
pub fn generated_home(generate: impl FnOnce(&Path)) -> (tempfile::TempDir, PathBuf, Duration) {
    let dir = tempfile::tempdir().expect("temp dir");
    let home = dir.path().join("home");
    let started = Instant::now();
    generate(&home);
    (dir, home, started.elapsed())
}

/// Runs `f`, measuring wall and CPU time.
pub fn timed<T>(f: impl FnOnce() -> T) -> (Phase, T) {
    let cpu = cpu_time();
    let started = Instant::now();
    let out = f();
    (Phase { wall: started.elapsed(), cpu: cpu_time().saturating_sub(cpu) }, out)
}

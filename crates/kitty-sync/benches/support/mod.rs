//! Timing shared by the benchmarks: wall and CPU time, so numbers taken on a loaded machine
//! still mean something.

use std::time::Duration;

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

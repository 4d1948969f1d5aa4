//! Helpers shared by `status_cli.rs` and `retention_cli.rs`: the real binary in a temporary
//! home, and real built-in receivers as child processes on 127.0.0.1:0 (killed on drop).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::SystemTime;

use serde_json::Value;

use crate::common;

pub const BIN: &str = env!("CARGO_BIN_EXE_kitty-sync");

/// A temporary directory holding a home (created lazily by the commands) and receiver DBs.
pub struct TestHome {
    pub dir: tempfile::TempDir,
    pub home: PathBuf,
}

impl TestHome {
    pub fn new() -> TestHome {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        TestHome { dir, home }
    }

    /// A command on this home with a clean environment (no SaaS variables, no colour).
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut command = Command::new(BIN);
        command
            .arg("--home")
            .arg(&self.home)
            .args(args)
            .env_remove("SPEC_KITTY_SAAS_URL")
            .env_remove("SPEC_KITTY_ENABLE_SAAS_SYNC")
            .env_remove("SPEC_KITTY_HOME")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null());
        command
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// Runs and asserts the exit code; returns stdout.
    pub fn expect(&self, code: i32, args: &[&str]) -> String {
        let out = self.run(args);
        assert_eq!(
            out.status.code(),
            Some(code),
            "kitty-sync {args:?}\nstdout: {}\nstderr: {}",
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    pub fn ok(&self, args: &[&str]) -> String {
        self.expect(0, args)
    }

    /// `--json` output of a command expected to exit with `code`.
    pub fn json_code(&self, code: i32, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        let stdout = self.expect(code, &all);
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
    }

    /// `--json` output as printed (key order kept, for snapshots) and parsed.
    pub fn json_text(&self, code: i32, args: &[&str]) -> (String, Value) {
        let mut all = args.to_vec();
        all.push("--json");
        let stdout = self.expect(code, &all);
        let value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
        (stdout, value)
    }

    pub fn json(&self, args: &[&str]) -> Value {
        self.json_code(0, args)
    }

    pub fn status(&self) -> Value {
        self.json(&["status"])
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn store_path(&self) -> PathBuf {
        self.home.join("event-sync").join("kitty-sync.db")
    }

    /// The database file plus its WAL (which stays in place between commands), as the
    /// commands report it.
    pub fn store_bytes(&self) -> u64 {
        let wal = PathBuf::from(format!("{}-wal", self.store_path().display()));
        [self.store_path(), wal].iter().map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)).sum()
    }

    pub fn write_config(&self, text: &str) {
        std::fs::create_dir_all(&self.home).unwrap();
        std::fs::write(self.home.join("config.toml"), text).unwrap();
    }

    pub fn mode_external(&self, receiver: &ReceiverProcess) {
        self.ok(&["mode", "external-receiver", "--endpoint", &receiver.endpoint()]);
    }

    /// Imports JSON Lines (one envelope per line) and returns the `--json` report.
    pub fn emit_lines(&self, lines: &[String]) -> Value {
        let file = self.path(&format!("import-{}.jsonl", lines.len()));
        std::fs::write(&file, lines.join("\n") + "\n").unwrap();
        self.json(&["emit", "--jsonl", file.to_str().unwrap()])
    }

    /// `now --json`, expecting `code`.
    pub fn drain(&self, code: i32, extra: &[&str]) -> Value {
        let mut args = vec!["now"];
        args.extend_from_slice(extra);
        self.json_code(code, &args)
    }

    pub fn inspect(&self, event_id: &str) -> Value {
        self.json(&["inspect", event_id])
    }
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `01KVYWRGJEV7CEZW6J7G` + 6 digits: a valid ULID per event, deterministic for snapshots.
pub fn event_id(prefix: &str, n: usize) -> String {
    format!("01KVYWRGJEV7CEZW6J{prefix}{n:06}")
}

/// One envelope line with a fixed id, type and a payload of roughly `pad` extra bytes.
pub fn envelope(prefix: &str, n: usize, event_type: &str, pad: usize) -> String {
    let blob = format!("{n:06}").repeat(pad / 6);
    format!(
        r#"{{"event_id":"{}","event_type":"{event_type}","aggregate_id":"agg-{n}","payload":{{"n":{n},"blob":"{blob}"}}}}"#,
        event_id(prefix, n)
    )
}

pub fn envelopes(prefix: &str, range: std::ops::Range<usize>, event_type: &str, pad: usize) -> Vec<String> {
    range.map(|n| envelope(prefix, n, event_type, pad)).collect()
}

/// A built-in receiver whose database is `<dir>/<name>.db`; killed when dropped. A thin name
/// over the delivery tests' launcher, so there is one way to start a receiver in the tests.
pub struct ReceiverProcess {
    inner: common::Receiver,
    /// `http://127.0.0.1:PORT`
    pub url: String,
}

impl ReceiverProcess {
    pub fn start(dir: &Path, name: &str, extra: &[&str]) -> ReceiverProcess {
        let inner = common::Receiver::start(&dir.join(format!("{name}.db")), extra);
        let url = inner.base();
        ReceiverProcess { inner, url }
    }

    pub fn endpoint(&self) -> String {
        self.inner.endpoint()
    }

    /// Stops the receiver for good (connections to its port are refused afterwards).
    pub fn kill(&mut self) {
        self.inner.stop();
    }

    /// Event ids the receiver stored (`receiver dump --json`).
    pub fn stored_ids(&self) -> Vec<String> {
        self.inner.dump().ids()
    }
}

/// Every file and directory under `root`: relative path → (is_dir, size, mtime).
pub fn tree(root: &Path) -> BTreeMap<PathBuf, (bool, u64, Option<SystemTime>)> {
    let mut out = BTreeMap::new();
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, (bool, u64, Option<SystemTime>)>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for entry in entries.flatten() {
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            out.insert(rel, (meta.is_dir(), if meta.is_dir() { 0 } else { meta.len() }, meta.modified().ok()));
            if meta.is_dir() {
                walk(root, &path, out);
            }
        }
    }
    walk(root, root, &mut out);
    out
}

/// Snapshot filters: temp paths, ports, times, ids and sizes that differ between runs.
pub fn filters(home: &TestHome) -> Vec<(String, String)> {
    let dir = regex_escape(&home.dir.path().display().to_string());
    vec![
        (dir, "[tmp]".into()),
        (r"127\.0\.0\.1:\d+".into(), "127.0.0.1:[port]".into()),
        (r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z".into(), "[time]".into()),
        (r"tgt_[a-z0-9_]+_[0-9a-f]{32}".into(), "[target-id]".into()),
        (r#""server_instance_id": "[0-9A-HJKMNP-TV-Z]{26}""#.into(), r#""server_instance_id": "[ulid]""#.into()),
        (r#""store_file_bytes": \d+"#.into(), r#""store_file_bytes": "[bytes]""#.into()),
        (r#""store_bytes_(before|after)": \d+"#.into(), r#""store_bytes_$1": "[bytes]""#.into()),
        (r#""bytes": \d+"#.into(), r#""bytes": "[bytes]""#.into()),
        (r"store file \d+(\.\d+)? (B|KiB|MiB|GiB)".into(), "store file [size]".into()),
        (r"archive-\d{8}T\d{6}\.\d{3}Z".into(), "archive-[stamp]".into()),
    ]
}

/// `text` as a regex matching itself (for snapshot filters).
pub fn regex_escape(text: &str) -> String {
    let mut out = String::new();
    for c in text.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Asserts a text snapshot with the run-specific parts filtered out.
macro_rules! snapshot {
    ($home:expr, $name:expr, $value:expr) => {{
        let filters = status_support::filters($home);
        let refs: Vec<(&str, &str)> = filters.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        insta::with_settings!({ filters => refs, prepend_module_to_snapshot => true, omit_expression => true }, {
            insta::assert_snapshot!($name, $value);
        });
    }};
}

/// The exact key set of a JSON object.
pub fn keys(value: &Value) -> Vec<String> {
    let mut keys: Vec<String> =
        value.as_object().unwrap_or_else(|| panic!("not an object: {value}")).keys().cloned().collect();
    keys.sort();
    keys
}

pub fn sorted(list: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = list.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

/// Makes everything under `root` (and `root`) read-only, or writable again.
pub fn chmod_recursive(root: &Path, writable: bool) {
    use std::os::unix::fs::PermissionsExt;
    for (rel, (is_dir, _, _)) in tree(root).into_iter().rev() {
        set_mode(&root.join(rel), is_dir, writable);
    }
    set_mode(root, true, writable);
    fn set_mode(path: &Path, is_dir: bool, writable: bool) {
        let mode = match (is_dir, writable) {
            (true, true) => 0o755,
            (true, false) => 0o555,
            (false, true) => 0o644,
            (false, false) => 0o444,
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }
}

pub fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| text(&o.stdout).trim() == "0").unwrap_or(false)
}

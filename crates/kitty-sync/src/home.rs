//! The spec-kitty home directory and the two files kitty-sync shares with spec-kitty:
//! `config.toml` (read, and edited in place preserving the operator's text) and
//! `credentials` (read; rewritten only on token refresh).

use std::fs;
use std::path::{Path, PathBuf};

pub use crate::atomic_write::write_atomically;
use crate::error::{Error, Result};
use crate::mode::EventSyncMode;

pub const HOME_ENV: &str = "SPEC_KITTY_HOME";
pub const SYNC_DIR: &str = "event-sync";
pub const STORE_FILE: &str = "kitty-sync.db";
/// A token refresh is one HTTP round trip; waiting longer means something is stuck.
const CREDENTIALS_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct Home {
    root: PathBuf,
}

impl Home {
    /// `--home DIR`, else a non-empty `SPEC_KITTY_HOME` (verbatim), else `~/.spec-kitty`.
    pub fn resolve(flag: Option<&Path>) -> Result<Home> {
        if let Some(dir) = flag {
            // An empty path would silently make the current directory the home (and write
            // `config.toml` and `event-sync/` there).
            if dir.as_os_str().is_empty() {
                return Err(Error::usage(
                    "--home is empty",
                    "pass a directory, e.g. --home ~/.spec-kitty, or omit --home to use SPEC_KITTY_HOME or ~/.spec-kitty",
                ));
            }
            return Ok(Home::at(dir));
        }
        if let Some(dir) = std::env::var_os(HOME_ENV).filter(|v| !v.is_empty()) {
            return Ok(Home::at(Path::new(&dir)));
        }
        match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
            Some(user_home) => Ok(Home::at(&Path::new(&user_home).join(".spec-kitty"))),
            None => Err(Error::usage(
                "cannot find the spec-kitty home: HOME is not set",
                "pass --home DIR or set SPEC_KITTY_HOME",
            )),
        }
    }

    pub fn at(dir: &Path) -> Home {
        Home { root: dir.to_path_buf() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn config_path(&self) -> PathBuf {
        self.root.join("config.toml")
    }

    pub fn credentials_path(&self) -> PathBuf {
        self.root.join("credentials")
    }

    pub fn sync_dir(&self) -> PathBuf {
        self.root.join(SYNC_DIR)
    }

    pub fn store_path(&self) -> PathBuf {
        self.sync_dir().join(STORE_FILE)
    }

    pub fn drain_lock_path(&self) -> PathBuf {
        self.sync_dir().join("drain.lock")
    }

    pub fn active_queue_scope_path(&self) -> PathBuf {
        self.root.join("active_queue_scope")
    }

    /// Creates the home and `event-sync/` (owner-only) for commands that write.
    pub fn ensure_sync_dir(&self) -> Result<PathBuf> {
        let dir = self.sync_dir();
        create_private_dir(&dir)?;
        Ok(dir)
    }

    pub fn load_config(&self) -> Result<Config> {
        Config::load(&self.config_path())
    }

    /// Reads `credentials` once; see [`CredentialsFile`] for what a bad file means.
    pub fn read_credentials(&self) -> CredentialsFile {
        CredentialsFile::read(&self.credentials_path())
    }

    /// Serialises token refreshes (read, refresh, rewrite of `credentials`) between
    /// kitty-sync processes. Inside `event-sync/`: the home itself is spec-kitty's too.
    pub fn credentials_lock_path(&self) -> PathBuf {
        self.sync_dir().join("credentials.lock")
    }

    /// Takes the credentials lock, waiting a little for another refresh to finish; released
    /// when the returned file is dropped (or the process dies).
    pub fn lock_credentials(&self) -> Result<fs::File> {
        self.ensure_sync_dir()?;
        let path = self.credentials_lock_path();
        let mut options = fs::OpenOptions::new();
        options.create(true).truncate(false).write(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let file = options.open(&path).map_err(|e| Error::io("cannot open the lock file", &path, e))?;
        let deadline = std::time::Instant::now() + CREDENTIALS_LOCK_WAIT;
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(file),
                Err(fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(fs::TryLockError::WouldBlock) => {
                    return Err(Error::busy(
                        format!("another kitty-sync process is refreshing the token in {}", self.root.display()),
                        "run the command again in a moment",
                    ));
                }
                Err(fs::TryLockError::Error(e)) => return Err(Error::io("cannot lock", &path, e)),
            }
        }
    }
}

fn create_private_dir(dir: &Path) -> Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(|e| Error::io("cannot create directory", dir, e))
}

/// Reads a file that may legitimately be missing.
fn read_optional(path: &Path) -> Result<Option<String>> {
    match fs::read(path) {
        Ok(bytes) => String::from_utf8(bytes).map(Some).map_err(|_| {
            Error::usage(
                format!("{} is not valid UTF-8", path.display()),
                "fix the file's encoding (TOML files must be UTF-8)",
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io("cannot read", path, e)),
    }
}

/// 1-based line of a byte offset, for error messages.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())].iter().filter(|b| **b == b'\n').count() + 1
}

fn toml_error(path: &Path, text: &str, err: &toml::de::Error) -> Error {
    let line = err.span().map(|s| line_of(text, s.start)).unwrap_or(1);
    Error::usage(
        format!("{} is not valid TOML (line {line}): {}", path.display(), err.message().trim()),
        format!("fix line {line} of {} by hand; kitty-sync will not overwrite a file it cannot read", path.display()),
    )
}

fn parse_table(path: &Path, text: &str) -> Result<toml::Table> {
    text.parse::<toml::Table>().map_err(|e| toml_error(path, text, &e))
}

fn string_at<'a>(table: &'a toml::Table, section: &str, key: &str) -> Option<&'a str> {
    table.get(section)?.as_table()?.get(key)?.as_str().map(str::trim).filter(|s| !s.is_empty())
}

/// What kitty-sync reads from `config.toml`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    pub server_url: Option<String>,
    /// The raw `[event_sync] mode` token, validated by [`Config::mode`].
    pub mode_token: Option<String>,
    pub external_endpoint: Option<String>,
    pub external_token_env: Option<String>,
    pub local_only_types: Vec<String>,
    /// `[[event_sync.targets]]` (contract §9).
    pub named_targets: crate::targets_config::NamedTargets,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config> {
        let Some(text) = read_optional(path)? else {
            return Ok(Config::default());
        };
        let table = parse_table(path, &text)?;
        let local_only_types = table
            .get("event_sync")
            .and_then(|t| t.as_table())
            .and_then(|t| t.get("local_only_types"))
            .and_then(|v| v.as_array())
            .map(|items| items.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
            .unwrap_or_default();
        Ok(Config {
            server_url: string_at(&table, "sync", "server_url").map(str::to_string),
            mode_token: string_at(&table, "event_sync", "mode").map(str::to_string),
            external_endpoint: string_at(&table, "event_sync", "external_endpoint").map(str::to_string),
            external_token_env: string_at(&table, "event_sync", "external_token_env").map(str::to_string),
            local_only_types,
            named_targets: crate::targets_config::NamedTargets::parse(&table, path),
        })
    }

    /// The configured mode; default `teamspace`. An unknown token is a configuration error.
    pub fn mode(&self) -> Result<EventSyncMode> {
        match &self.mode_token {
            None => Ok(EventSyncMode::Teamspace),
            Some(token) => EventSyncMode::parse(token).map_err(|_| {
                Error::usage(
                    format!("config.toml has an unknown [event_sync] mode {token:?}"),
                    "set a valid mode with `kitty-sync mode teamspace|external-receiver|local-retention|opt-out`",
                )
            }),
        }
    }
}

/// Edits `config.toml` in place: every other key, table and comment of the operator's file
/// survives. A file that does not parse is refused, never overwritten. Prefer
/// [`try_edit_config`] with [`set_config_string`]: indexing a document (`doc["t"]["k"]`)
/// panics when `t` is not a table.
pub fn edit_config(path: &Path, edit: impl FnOnce(&mut toml_edit::DocumentMut)) -> Result<()> {
    try_edit_config(path, |doc| {
        edit(doc);
        Ok(())
    })
}

/// [`edit_config`] with an edit that may refuse (see [`set_config_string`]); then the file is
/// left untouched.
pub fn try_edit_config(path: &Path, edit: impl FnOnce(&mut toml_edit::DocumentMut) -> Result<()>) -> Result<()> {
    let text = read_optional(path)?.unwrap_or_default();
    let mut doc = text.parse::<toml_edit::DocumentMut>().map_err(|e| {
        let line = e.span().map(|s| line_of(&text, s.start)).unwrap_or(1);
        Error::usage(
            format!("{} is not valid TOML (line {line}): {}", path.display(), e.message().trim()),
            format!(
                "fix line {line} of {} by hand; kitty-sync will not overwrite a file it cannot read",
                path.display()
            ),
        )
    })?;
    edit(&mut doc)?;
    if let Some(parent) = path.parent() {
        create_private_dir(parent)?;
    }
    write_atomically(path, doc.to_string().as_bytes(), None)
}

/// Sets `[table] key = "value"` in a `config.toml` document.
///
/// Why not `doc[table][key] = value(..)`: toml_edit's indexing panics when `table` exists but
/// is not a table (`sync = "x"`, or `[[sync]]`), and a fresh value drops the operator's inline
/// comment (`server_url = "…" # prod`). Here a non-table is a usage error naming the file, and
/// the old value's surrounding whitespace and comments are kept.
pub fn set_config_string(
    doc: &mut toml_edit::DocumentMut,
    path: &Path,
    table: &str,
    key: &str,
    value: &str,
) -> Result<()> {
    let not_a_table = || {
        Error::usage(
            format!("{}: `{table}` is not a table, so `{table}.{key}` cannot be set", path.display()),
            format!("edit {} by hand so that `{table}` is a [{table}] table; nothing was changed", path.display()),
        )
    };
    let item = doc.entry(table).or_insert_with(toml_edit::table);
    let table_like = item.as_table_like_mut().ok_or_else(not_a_table)?;
    let mut new_value = toml_edit::Value::from(value);
    match table_like.get_mut(key) {
        Some(existing) => {
            if let Some(old) = existing.as_value() {
                *new_value.decor_mut() = old.decor().clone();
            }
            *existing = toml_edit::Item::Value(new_value);
        }
        None => {
            table_like.insert(key, toml_edit::Item::Value(new_value));
        }
    }
    Ok(())
}

/// What kitty-sync reads from `credentials`. Token values never leave this struct in output.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    pub access_token: Option<String>,
    pub refresh_token: Option<String>,
    pub access_expires_at: Option<String>,
    pub refresh_expires_at: Option<String>,
    pub username: Option<String>,
    pub team_slug: Option<String>,
    pub server_url: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_token", &self.access_token.as_ref().map(|_| "<redacted>"))
            .field("refresh_token", &self.refresh_token.as_ref().map(|_| "<redacted>"))
            .field("access_expires_at", &self.access_expires_at)
            .field("refresh_expires_at", &self.refresh_expires_at)
            .field("username", &self.username)
            .field("team_slug", &self.team_slug)
            .field("server_url", &self.server_url)
            .finish()
    }
}

/// `credentials` as read once per process, with one policy for a file that cannot be used:
/// capture goes on with a warning, `status` goes on (the warning names the file and line and
/// Teamspace delivery shows as blocked), delivery to Teamspace stops with exit 2, external
/// targets go on.
#[derive(Debug, Clone)]
pub enum CredentialsFile {
    Absent,
    Parsed(Credentials),
    /// Present but not readable as TOML (or not UTF-8, or not readable at all).
    Unreadable {
        message: String,
        hint: String,
    },
}

impl CredentialsFile {
    pub fn read(path: &Path) -> CredentialsFile {
        match Credentials::load(path) {
            Ok(None) => CredentialsFile::Absent,
            Ok(Some(c)) => CredentialsFile::Parsed(c),
            Err(e) => CredentialsFile::Unreadable { message: e.to_string(), hint: e.hint().to_string() },
        }
    }

    /// The parsed credentials; `None` when absent or unreadable.
    pub fn credentials(&self) -> Option<&Credentials> {
        match self {
            CredentialsFile::Parsed(c) => Some(c),
            _ => None,
        }
    }

    /// For commands that go on without the file: says that it is ignored, and why.
    pub fn warning(&self) -> Option<String> {
        match self {
            CredentialsFile::Unreadable { message, hint } => {
                Some(format!("ignoring credentials: {message} (hint: {hint})"))
            }
            _ => None,
        }
    }

    /// Delivery to Teamspace cannot go on with a file it cannot read: exit 2, naming the file
    /// and line.
    pub fn require_readable(&self) -> Result<()> {
        match self {
            CredentialsFile::Unreadable { message, hint } => {
                Err(Error::usage(format!("cannot deliver to Teamspace: {message}"), hint.clone()))
            }
            _ => Ok(()),
        }
    }
}

impl Credentials {
    pub fn load(path: &Path) -> Result<Option<Credentials>> {
        let Some(text) = read_optional(path)? else {
            return Ok(None);
        };
        let table = parse_table(path, &text)?;
        let get = |section: &str, key: &str| string_at(&table, section, key).map(str::to_string);
        Ok(Some(Credentials {
            access_token: get("tokens", "access"),
            refresh_token: get("tokens", "refresh"),
            access_expires_at: get("tokens", "access_expires_at"),
            refresh_expires_at: get("tokens", "refresh_expires_at"),
            username: get("user", "username"),
            team_slug: get("user", "team_slug"),
            server_url: get("server", "url"),
        }))
    }

    /// A token that is present and, when its expiry is known, not expired.
    pub fn has_usable_access(&self, now: jiff::Timestamp) -> bool {
        usable(self.access_token.as_deref(), self.access_expires_at.as_deref(), now)
    }

    pub fn can_refresh(&self, now: jiff::Timestamp) -> bool {
        usable(self.refresh_token.as_deref(), self.refresh_expires_at.as_deref(), now)
    }
}

fn usable(token: Option<&str>, expires_at: Option<&str>, now: jiff::Timestamp) -> bool {
    let Some(_) = token.filter(|t| !t.trim().is_empty()) else {
        return false;
    };
    match expires_at.and_then(crate::clock::parse_rfc3339) {
        Some(expiry) => expiry > now,
        // Unknown or unparsable expiry: let the server decide.
        None => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_known_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        fs::write(
            &path,
            "# mine\n[sync]\nserver_url = \"https://x.example\"\nmax_queue_size = 5\n\n[event_sync]\nmode = \"external_receiver\"\nexternal_endpoint = \"http://127.0.0.1:1/\"\nlocal_only_types = [\"A\", \"B\"]\n",
        )
        .unwrap();
        let config = Config::load(&path).unwrap();
        assert_eq!(config.server_url.as_deref(), Some("https://x.example"));
        assert_eq!(config.mode().unwrap(), EventSyncMode::ExternalReceiver);
        assert_eq!(config.local_only_types, vec!["A", "B"]);
    }

    #[test]
    fn corrupt_config_names_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        fs::write(&path, "[sync]\nserver_url = \"https://x\"\nbroken = = 1\n").unwrap();
        let err = Config::load(&path).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("line 3"), "{err}");
        assert!(err.to_string().contains("config.toml"));
        let before = fs::read(&path).unwrap();
        let err =
            try_edit_config(&path, |doc| set_config_string(doc, &path, "sync", "server_url", "https://y")).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert_eq!(fs::read(&path).unwrap(), before, "a corrupt file is never overwritten");
    }

    #[test]
    fn edit_preserves_comments_and_other_tables() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        let original = "# operator notes\n[sync]\n# the server\nserver_url = \"https://old.example\" # inline\nbackground_daemon = \"manual\"\n\n[repo_defaults.\"a/b\"]\nenabled = true\n";
        fs::write(&path, original).unwrap();
        try_edit_config(&path, |doc| set_config_string(doc, &path, "sync", "server_url", "https://new.example"))
            .unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text, original.replace("https://old.example", "https://new.example"), "only the value changed");
        try_edit_config(&path, |doc| set_config_string(doc, &path, "event_sync", "mode", "opt_out")).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.starts_with(&original.replace("https://old.example", "https://new.example")), "{text}");
        assert!(text.ends_with("[event_sync]\nmode = \"opt_out\"\n"), "{text}");
    }

    #[test]
    fn setting_a_key_of_a_non_table_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        for original in ["sync = \"x\"\n", "[[sync]]\nserver_url = \"https://a.example\"\n"] {
            fs::write(&path, original).unwrap();
            let err =
                try_edit_config(&path, |doc| set_config_string(doc, &path, "sync", "server_url", "https://b.example"))
                    .unwrap_err();
            assert_eq!(err.exit_code(), 2);
            assert!(err.to_string().contains("config.toml"), "{err}");
            assert_eq!(fs::read_to_string(&path).unwrap(), original);
        }
        fs::write(&path, "sync = { server_url = \"https://a.example\" } # inline table\n").unwrap();
        try_edit_config(&path, |doc| set_config_string(doc, &path, "sync", "server_url", "https://b.example")).unwrap();
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            "sync = { server_url = \"https://b.example\" } # inline table\n"
        );
    }

    #[test]
    fn credentials_debug_hides_tokens() {
        let creds = Credentials { access_token: Some("s3cr3t".into()), ..Default::default() };
        assert!(!format!("{creds:?}").contains("s3cr3t"));
    }

    #[test]
    fn token_expiry() {
        let now = "2026-11-24T00:00:00Z".parse().unwrap();
        let mut creds = Credentials { access_token: Some("t".into()), ..Default::default() };
        assert!(creds.has_usable_access(now));
        creds.access_expires_at = Some("2026-11-23T00:00:00+00:00".into());
        assert!(!creds.has_usable_access(now));
        creds.access_expires_at = Some("2026-11-25T00:00:00.123456+00:00".into());
        assert!(creds.has_usable_access(now));
    }
}

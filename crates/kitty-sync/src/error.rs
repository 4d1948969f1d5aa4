//! Typed errors of the engine. Every error carries an operator-facing `hint` and maps to one
//! exit code of the contract (§3); the binary only renders them.

use std::path::{Path, PathBuf};

pub mod disk;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The contract's exit-code classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitClass {
    /// 1: I/O, database, internal error.
    Failure = 1,
    /// 2: usage or configuration error.
    Usage = 2,
    /// 3: a gate, conflict or policy stopped progress.
    Blocked = 3,
    /// 4: some work remains; safe to re-run.
    Incomplete = 4,
    /// 5: another drain holds the lock.
    Busy = 5,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input from the operator: flags, URLs, files, config. Exit 2.
    #[error("{message}")]
    Usage { message: String, hint: String },
    /// Progress stopped by a policy not covered below. Exit 3.
    #[error("{message}")]
    Blocked { message: String, hint: String },
    /// A delivery gate is closed (`saas_disabled`, `missing_auth`, `missing_team`,
    /// `missing_endpoint`); nothing was posted. Exit 3.
    #[error("{message}")]
    GatesClosed { reasons: Vec<String>, message: String, hint: String },
    /// The target's server was replaced behind its URL; only a re-drain goes on. Exit 3.
    #[error("{message}")]
    TargetReset { message: String, hint: String },
    /// A migration conflict (or what it protects) must be resolved by the operator. Exit 3.
    #[error("{message}")]
    ConflictUnresolved { message: String, hint: String },
    /// The receiver refused our credentials, and renewing them did not help. Exit 3.
    #[error("{message}")]
    AuthRefused { message: String, hint: String },
    /// Another process holds the drain lock. Exit 5.
    #[error("{message}")]
    Busy { message: String, hint: String },
    /// A filesystem operation failed. Exit 1.
    #[error("{action} {}: {source}", path.display())]
    Io { action: &'static str, path: PathBuf, hint: String, source: std::io::Error },
    /// The store could not be read or written. Exit 1.
    #[error("{context}: {source}")]
    Store { context: String, hint: String, source: rusqlite::Error },
    /// The store exists but cannot be used as-is (corrupt, newer schema). Exit 1.
    #[error("{message}")]
    StoreUnusable { message: String, hint: String },
    /// Anything else that went wrong inside. Exit 1.
    #[error("{message}")]
    Internal { message: String, hint: String },
}

impl Error {
    pub fn usage(message: impl Into<String>, hint: impl Into<String>) -> Self {
        Error::Usage { message: message.into(), hint: hint.into() }
    }

    pub fn blocked(message: impl Into<String>, hint: impl Into<String>) -> Self {
        Error::Blocked { message: message.into(), hint: hint.into() }
    }

    pub fn gates_closed(reasons: Vec<String>, message: impl Into<String>, hint: impl Into<String>) -> Self {
        Error::GatesClosed { reasons, message: message.into(), hint: hint.into() }
    }

    pub fn target_reset(message: impl Into<String>, hint: impl Into<String>) -> Self {
        Error::TargetReset { message: message.into(), hint: hint.into() }
    }

    pub fn conflict_unresolved(message: impl Into<String>, hint: impl Into<String>) -> Self {
        Error::ConflictUnresolved { message: message.into(), hint: hint.into() }
    }

    pub fn auth_refused(message: impl Into<String>, hint: impl Into<String>) -> Self {
        Error::AuthRefused { message: message.into(), hint: hint.into() }
    }

    pub fn busy(message: impl Into<String>, hint: impl Into<String>) -> Self {
        Error::Busy { message: message.into(), hint: hint.into() }
    }

    pub fn internal(message: impl Into<String>, hint: impl Into<String>) -> Self {
        Error::Internal { message: message.into(), hint: hint.into() }
    }

    pub fn io(action: &'static str, path: &Path, source: std::io::Error) -> Self {
        let hint = match (disk::DiskCondition::of_io(&source), source.kind()) {
            (Some(condition), _) => condition.hint(path),
            (None, std::io::ErrorKind::NotFound) => format!("check that {} exists", path.display()),
            (None, _) => "check the disk and the path, then run the command again".to_string(),
        };
        Error::Io { action, path: path.to_path_buf(), hint, source }
    }

    pub fn store(context: impl Into<String>, source: rusqlite::Error) -> Self {
        let context = context.into();
        if is_busy(&source) {
            let hint = "another kitty-sync process holds the store for a long time; retry when it finishes";
            return Error::Store { context, hint: hint.to_string(), source };
        }
        if let Some((condition, place)) = disk::store_condition(&source) {
            let context = format!("{context} ({})", condition.label());
            return Error::Store { context, hint: condition.hint(&place), source };
        }
        let hint = if is_corrupt(&source) {
            disk::CORRUPT_HINT
        } else {
            "check the disk holding the kitty-sync home, then run the command again; \
             `kitty-sync doctor` checks the store"
        };
        Error::Store { context, hint: hint.to_string(), source }
    }

    /// The one mapping of errors to the contract's exit classes.
    pub fn class(&self) -> ExitClass {
        match self {
            Error::Usage { .. } => ExitClass::Usage,
            Error::Blocked { .. }
            | Error::GatesClosed { .. }
            | Error::TargetReset { .. }
            | Error::ConflictUnresolved { .. }
            | Error::AuthRefused { .. } => ExitClass::Blocked,
            Error::Busy { .. } => ExitClass::Busy,
            Error::Io { .. } | Error::Store { .. } | Error::StoreUnusable { .. } | Error::Internal { .. } => {
                ExitClass::Failure
            }
        }
    }

    pub fn exit_code(&self) -> u8 {
        self.class() as u8
    }

    pub fn hint(&self) -> &str {
        match self {
            Error::Usage { hint, .. }
            | Error::Blocked { hint, .. }
            | Error::GatesClosed { hint, .. }
            | Error::TargetReset { hint, .. }
            | Error::ConflictUnresolved { hint, .. }
            | Error::AuthRefused { hint, .. }
            | Error::Busy { hint, .. }
            | Error::Io { hint, .. }
            | Error::Store { hint, .. }
            | Error::StoreUnusable { hint, .. }
            | Error::Internal { hint, .. } => hint,
        }
    }
}

fn is_corrupt(error: &rusqlite::Error) -> bool {
    matches!(error.sqlite_error_code(), Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase))
}

fn is_busy(error: &rusqlite::Error) -> bool {
    matches!(error.sqlite_error_code(), Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked))
}

/// Adds context to a rusqlite result.
pub(crate) trait StoreContext<T> {
    fn ctx(self, context: &str) -> Result<T>;
}

impl<T> StoreContext<T> for std::result::Result<T, rusqlite::Error> {
    fn ctx(self, context: &str) -> Result<T> {
        self.map_err(|e| Error::store(context, e))
    }
}

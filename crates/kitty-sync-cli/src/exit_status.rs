//! How the process ends (contract §3). Commands return an [`ExitStatus`], never a bare
//! integer; engine errors map to it through their one [`ExitClass`].

use std::process::ExitCode;

use kitty_sync::ExitClass;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// 0: done; nothing left that this command could have done.
    Success,
    /// 1: I/O, database, internal error.
    Failure,
    /// 2: usage or configuration error.
    Usage,
    /// 3: a gate, conflict or policy stopped progress.
    Blocked,
    /// 4: some work remains; safe to re-run.
    Incomplete,
    /// 5: another drain holds the lock.
    Busy,
}

impl ExitStatus {
    pub fn code(self) -> u8 {
        match self {
            ExitStatus::Success => 0,
            ExitStatus::Failure => 1,
            ExitStatus::Usage => 2,
            ExitStatus::Blocked => 3,
            ExitStatus::Incomplete => 4,
            ExitStatus::Busy => 5,
        }
    }
}

impl From<ExitClass> for ExitStatus {
    fn from(class: ExitClass) -> ExitStatus {
        match class {
            ExitClass::Failure => ExitStatus::Failure,
            ExitClass::Usage => ExitStatus::Usage,
            ExitClass::Blocked => ExitStatus::Blocked,
            ExitClass::Incomplete => ExitStatus::Incomplete,
            ExitClass::Busy => ExitStatus::Busy,
        }
    }
}

impl From<ExitStatus> for ExitCode {
    fn from(status: ExitStatus) -> ExitCode {
        ExitCode::from(status.code())
    }
}

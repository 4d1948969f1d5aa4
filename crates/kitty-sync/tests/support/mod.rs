//! Helpers shared by the migration test binaries (each uses a part of them).
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

/// `shared/fixtures` beside the repository (`/work/shared` for `/work/main` and for a
/// worktree under `/work/wt/NAME` alike): the first ancestor that has it.
pub fn shared_fixtures() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.ancestors()
        .map(|dir| dir.join("shared/fixtures"))
        .find(|dir| dir.is_dir())
        .unwrap_or_else(|| here.join("../../../shared/fixtures"))
}

/// Copies a fixture tree; the copies are writable (the fixtures are read-only), so a test can
/// play the Python CLI writing on.
pub fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), &target).unwrap();
            let mut perms = fs::metadata(&target).unwrap().permissions();
            #[allow(clippy::permissions_set_readonly_false)]
            perms.set_readonly(false);
            fs::set_permissions(&target, perms).unwrap();
        }
    }
}

/// The events of a Python fixture manifest that Python held for lack of consent: captured in
/// a 3.2.7 epoch that was never `eligible`.
pub fn unconsented_ids(manifest: &serde_json::Value) -> BTreeSet<String> {
    manifest["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["epoch_state_by_source"].as_object().is_some_and(|s| !s.values().any(|v| v == "eligible")))
        .map(|e| e["event_id"].as_str().unwrap().to_string())
        .collect()
}

//! Delivery targets: identity (canonical URL + team + user), registration on first use, and
//! the deployment metadata a target's health endpoint reports (provenance, never identity).

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use crate::envelope::sha256_hex;
use crate::error::{Result, StoreContext};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetKind {
    Teamspace,
    External,
}

impl TargetKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TargetKind::Teamspace => "teamspace",
            TargetKind::External => "external",
        }
    }
}

/// What makes a target itself. A new identity is a new target: every retained event is due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetIdentity {
    pub kind: TargetKind,
    pub canonical_url: String,
    pub team_slug: String,
    pub user_email: String,
}

impl TargetIdentity {
    /// `tgt_<team or anon>_<32 hex>`, stable for the identity (spec-kitty 3.2.4's rule).
    pub fn target_id(&self) -> String {
        let url_hash = sha256_hex(self.canonical_url.as_bytes());
        let digest = sha256_hex(format!("{url_hash}\0{}\0{}", self.team_slug, self.user_email).as_bytes());
        let scope: String = if self.team_slug.is_empty() {
            "anon".into()
        } else {
            self.team_slug.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' }).collect()
        };
        format!("tgt_{scope}_{}", &digest[..32])
    }
}

/// Health-endpoint facts about the server behind a target.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DeploymentMetadata {
    pub server_instance_id: Option<String>,
    pub deployment_id: Option<String>,
    pub environment_name: Option<String>,
    pub git_sha: Option<String>,
}

/// A registered target as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetRecord {
    /// Internal row id (ledger key).
    pub id: i64,
    pub target_id: String,
    pub identity: TargetIdentity,
    pub deployment: DeploymentMetadata,
    pub first_seen_at: i64,
    pub last_seen_at: i64,
    pub epoch: i64,
    pub due_from_seq: i64,
}

const TARGET_COLUMNS: &str = "id, target_id, kind, canonical_url, team_slug, user_email, server_instance_id,
    deployment_id, environment_name, git_sha, first_seen_at, last_seen_at, epoch, due_from_seq";

fn read_record(r: &rusqlite::Row<'_>) -> rusqlite::Result<TargetRecord> {
    let kind: String = r.get(2)?;
    Ok(TargetRecord {
        id: r.get(0)?,
        target_id: r.get(1)?,
        identity: TargetIdentity {
            kind: if kind == "teamspace" { TargetKind::Teamspace } else { TargetKind::External },
            canonical_url: r.get(3)?,
            team_slug: r.get(4)?,
            user_email: r.get(5)?,
        },
        deployment: DeploymentMetadata {
            server_instance_id: r.get(6)?,
            deployment_id: r.get(7)?,
            environment_name: r.get(8)?,
            git_sha: r.get(9)?,
        },
        first_seen_at: r.get(10)?,
        last_seen_at: r.get(11)?,
        epoch: r.get(12)?,
        due_from_seq: r.get(13)?,
    })
}

/// Registers the identity on first use (or touches `last_seen_at`) and returns the record.
/// A Teamspace identity resolves like [`find`]: to the user-less target of the same server and
/// team when that exists and the user has none of their own.
pub fn register(conn: &Connection, identity: &TargetIdentity, now_ms: i64) -> Result<TargetRecord> {
    match find(conn, identity)? {
        Some(record) if record.identity != *identity => {
            conn.execute(
                "UPDATE targets SET last_seen_at = max(last_seen_at, ?2) WHERE id = ?1",
                params![record.id, now_ms],
            )
            .ctx("cannot register the delivery target")?;
            Ok(TargetRecord { last_seen_at: record.last_seen_at.max(now_ms), ..record })
        }
        _ => register_exact(conn, identity, now_ms).map(|(record, _)| record),
    }
}

/// Registers exactly this identity (no fallback); also says whether it was created.
pub fn register_exact(conn: &Connection, identity: &TargetIdentity, now_ms: i64) -> Result<(TargetRecord, bool)> {
    let existed = find_exact(conn, identity)?.is_some();
    conn.execute(
        "INSERT INTO targets (target_id, kind, canonical_url, team_slug, user_email, first_seen_at, last_seen_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)
         ON CONFLICT(canonical_url, team_slug, user_email) DO UPDATE SET last_seen_at = excluded.last_seen_at",
        params![
            identity.target_id(),
            identity.kind.as_str(),
            identity.canonical_url,
            identity.team_slug,
            identity.user_email,
            now_ms
        ],
    )
    .ctx("cannot register the delivery target")?;
    let record = find_exact(conn, identity)?
        .ok_or_else(|| crate::Error::internal("target vanished after registration", "run again"))?;
    Ok((record, !existed))
}

/// The stored record for an identity, if it was ever registered (read-only).
///
/// spec-kitty 3.2.4 recorded its Teamspace targets without a user (contract §12): a Teamspace
/// identity with a user that has no target of its own is that user-less target of the same
/// server and team, so logging in never re-sends what Python delivered.
pub fn find(conn: &Connection, identity: &TargetIdentity) -> Result<Option<TargetRecord>> {
    if let Some(record) = find_exact(conn, identity)? {
        return Ok(Some(record));
    }
    if identity.kind != TargetKind::Teamspace || identity.user_email.is_empty() {
        return Ok(None);
    }
    let userless = TargetIdentity { user_email: String::new(), ..identity.clone() };
    Ok(find_exact(conn, &userless)?.filter(|r| r.identity.kind == TargetKind::Teamspace))
}

/// The stored record for exactly this identity.
pub fn find_exact(conn: &Connection, identity: &TargetIdentity) -> Result<Option<TargetRecord>> {
    conn.query_row(
        &format!(
            "SELECT {TARGET_COLUMNS} FROM targets WHERE canonical_url = ?1 AND team_slug = ?2 AND user_email = ?3"
        ),
        params![identity.canonical_url, identity.team_slug, identity.user_email],
        read_record,
    )
    .optional()
    .ctx("cannot read delivery targets")
}

/// Every known target, oldest first.
pub fn list(conn: &Connection) -> Result<Vec<TargetRecord>> {
    let mut stmt = conn
        .prepare(&format!("SELECT {TARGET_COLUMNS} FROM targets ORDER BY first_seen_at, id"))
        .ctx("cannot read delivery targets")?;
    let rows = stmt.query_map([], read_record).ctx("cannot read delivery targets")?;
    rows.collect::<std::result::Result<_, _>>().ctx("cannot read delivery targets")
}

/// Records what the health endpoint said (only the fields it reported).
/// Called only when no stable field changed; if one of them is reported equal to what was
/// recorded, a reset detected earlier is over (the server came back with its old identity,
/// e.g. restored from a backup).
pub fn record_deployment(conn: &Connection, target: i64, meta: &DeploymentMetadata) -> Result<()> {
    conn.execute(
        "UPDATE targets SET server_instance_id = coalesce(?2, server_instance_id),
             deployment_id = coalesce(?3, deployment_id), environment_name = coalesce(?4, environment_name),
             git_sha = coalesce(?5, git_sha),
             reset_detected = CASE WHEN ?2 = server_instance_id OR ?4 = environment_name THEN NULL
                                   ELSE reset_detected END
         WHERE id = ?1",
        params![target, meta.server_instance_id, meta.deployment_id, meta.environment_name, meta.git_sha],
    )
    .map(|_| ())
    .ctx("cannot record deployment metadata")
}

/// Moves the settled high-water mark (see the schema): only ever set by a drain that walked
/// the journal in order, or lowered by an operator action that makes events due again.
/// Both hold the drain lock; the compare-and-set against `from` (the mark the drain started
/// at) still lets a lower mark win should anything lower it without the lock.
pub fn set_due_from(conn: &Connection, target: i64, from: i64, seq: i64) -> Result<()> {
    conn.execute("UPDATE targets SET due_from_seq = ?3 WHERE id = ?1 AND due_from_seq = ?2", params![target, from, seq])
        .map(|_| ())
        .ctx("cannot update the target's delivery position")
}

/// Records the type filter the target is delivered with now (`None`: every type). When it
/// differs from the last one, the high-water mark goes back to the start: events of a newly
/// included type below it were skipped, never sent.
pub fn set_types(conn: &Connection, record: TargetRecord, types: Option<&[String]>) -> Result<TargetRecord> {
    let encoded = types.map(encode_types).transpose()?;
    let changed = conn
        .execute(
            "UPDATE targets SET types = ?2, due_from_seq = 0 WHERE id = ?1 AND types IS NOT ?2",
            params![record.id, encoded],
        )
        .ctx("cannot record the target's type filter")?;
    Ok(if changed > 0 { TargetRecord { due_from_seq: 0, ..record } } else { record })
}

/// A type filter as stored and bound: a JSON array, sorted and without repeats, so the same
/// filter written in another order is the same filter.
pub fn encode_types(types: &[String]) -> Result<String> {
    let mut sorted: Vec<&str> = types.iter().map(String::as_str).collect();
    sorted.sort_unstable();
    sorted.dedup();
    serde_json::to_string(&sorted)
        .map_err(|e| crate::Error::internal(format!("cannot encode a type filter: {e}"), "report this as a bug"))
}

/// Every registered target's stored type filter, by row id (`None`: every type).
pub fn stored_types(conn: &Connection) -> Result<Vec<(i64, Option<Vec<String>>)>> {
    let mut stmt = conn.prepare("SELECT id, types FROM targets ORDER BY id").ctx("cannot read targets")?;
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Option<String>>(1)?)))
        .ctx("cannot read targets")?
        .collect::<rusqlite::Result<Vec<_>>>()
        .ctx("cannot read targets")?;
    Ok(rows.into_iter().map(|(id, types)| (id, types.and_then(|t| serde_json::from_str(&t).ok()))).collect())
}

pub fn lower_due_from(conn: &Connection, target: i64, seq: i64) -> Result<()> {
    conn.execute("UPDATE targets SET due_from_seq = min(due_from_seq, ?2) WHERE id = ?1", params![target, seq])
        .map(|_| ())
        .ctx("cannot update the target's delivery position")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::home::Home;
    use crate::store::Store;

    fn external(url: &str) -> TargetIdentity {
        TargetIdentity {
            kind: TargetKind::External,
            canonical_url: url.into(),
            team_slug: String::new(),
            user_email: String::new(),
        }
    }

    #[test]
    fn target_ids_are_stable_and_scoped() {
        let a = external("http://127.0.0.1:1");
        assert_eq!(a.target_id(), external("http://127.0.0.1:1").target_id());
        assert!(a.target_id().starts_with("tgt_anon_"));
        assert_eq!(a.target_id().len(), "tgt_anon_".len() + 32);
        let team = TargetIdentity { team_slug: "Tëam-1".into(), kind: TargetKind::Teamspace, ..a.clone() };
        assert!(team.target_id().starts_with("tgt_T_am_1_"), "{}", team.target_id());
        assert_ne!(team.target_id(), a.target_id());
    }

    #[test]
    fn registration_is_idempotent_and_touches_last_seen() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&Home::at(dir.path())).unwrap();
        let first = register(store.conn(), &external("https://a.example"), 1_000).unwrap();
        let again = register(store.conn(), &external("https://a.example"), 2_000).unwrap();
        assert_eq!(first.id, again.id);
        assert_eq!(again.first_seen_at, 1_000);
        assert_eq!(again.last_seen_at, 2_000);
        let other = register(store.conn(), &external("https://b.example"), 3_000).unwrap();
        assert_ne!(other.id, first.id);
        assert_eq!(list(store.conn()).unwrap().len(), 2);
        record_deployment(
            store.conn(),
            first.id,
            &DeploymentMetadata { server_instance_id: Some("s1".into()), ..Default::default() },
        )
        .unwrap();
        let found = find(store.conn(), &external("https://a.example")).unwrap().unwrap();
        assert_eq!(found.deployment.server_instance_id.as_deref(), Some("s1"));
    }
}

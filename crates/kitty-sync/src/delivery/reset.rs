//! A target wiped behind a stable URL: the health endpoint's stable identity fields
//! (`server_instance_id`, `environment_name`) changed since they were recorded. Deployment
//! metadata is provenance, never identity: a new `deployment_id` alone is a redeploy.

use rusqlite::{Connection, params};
use serde::{Deserialize, Serialize};

use super::target::{DeploymentMetadata, TargetRecord};
use crate::error::{Error, Result, StoreContext};

/// What changed, kept on the target until the operator re-drains.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResetDetected {
    pub detected_at: String,
    /// `field: old → new` for each stable field that changed.
    pub changed_fields: Vec<String>,
    pub previous: DeploymentMetadata,
    pub current: DeploymentMetadata,
    pub recommendation: String,
}

pub const REDRAIN_HINT: &str = "kitty-sync now --redrain";

/// Read back from the store (the struct is defined with `target`).
impl<'de> Deserialize<'de> for DeploymentMetadata {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Raw {
            server_instance_id: Option<String>,
            deployment_id: Option<String>,
            environment_name: Option<String>,
            git_sha: Option<String>,
        }
        let r = Raw::deserialize(d)?;
        Ok(DeploymentMetadata {
            server_instance_id: r.server_instance_id,
            deployment_id: r.deployment_id,
            environment_name: r.environment_name,
            git_sha: r.git_sha,
        })
    }
}

/// Compares recorded stable fields with what the server reports now.
pub fn detect(recorded: &DeploymentMetadata, now: &DeploymentMetadata) -> Option<ResetDetected> {
    let mut changed = Vec::new();
    let fields = [
        ("server_instance_id", &recorded.server_instance_id, &now.server_instance_id),
        ("environment_name", &recorded.environment_name, &now.environment_name),
    ];
    for (name, old, new) in fields {
        if let (Some(old), Some(new)) = (old, new)
            && old != new
        {
            changed.push(format!("{name}: {old} → {new}"));
        }
    }
    (!changed.is_empty()).then(|| ResetDetected {
        detected_at: crate::clock::rfc3339_ms(crate::clock::now_ms()),
        changed_fields: changed,
        previous: recorded.clone(),
        current: now.clone(),
        recommendation: REDRAIN_HINT.to_string(),
    })
}

pub fn save(conn: &Connection, target: i64, reset: &ResetDetected) -> Result<()> {
    let json = serde_json::to_string(reset).unwrap_or_default();
    conn.execute("UPDATE targets SET reset_detected = ?2 WHERE id = ?1", params![target, json])
        .map(|_| ())
        .ctx("cannot record the detected reset")
}

pub fn load(conn: &Connection, target: i64) -> Result<Option<ResetDetected>> {
    let json: Option<String> = conn
        .query_row("SELECT reset_detected FROM targets WHERE id = ?1", [target], |r| r.get(0))
        .ctx("cannot read the target")?;
    Ok(json.and_then(|j| serde_json::from_str(&j).ok()))
}

pub fn blocked_error(record: &TargetRecord, reset: &ResetDetected) -> Error {
    Error::target_reset(
        format!(
            "{} looks wiped or replaced ({}); nothing was delivered, because the ledger says it already has events it may have lost",
            record.identity.canonical_url,
            reset.changed_fields.join(", ")
        ),
        format!("if the server really was reset, run `{REDRAIN_HINT}` to deliver every retained event to it again"),
    )
}

/// Starts a new epoch for the target: old ledger rows stay as history, every retained event
/// is due again, and the new server identity is recorded. Returns how many events can no
/// longer be re-delivered because gc purged their payloads.
pub fn start_new_epoch(conn: &Connection, record: &TargetRecord, now_meta: Option<&DeploymentMetadata>) -> Result<i64> {
    let tx = conn.unchecked_transaction().ctx("cannot start the re-drain")?;
    tx.execute(
        "UPDATE targets SET epoch = epoch + 1, due_from_seq = 0, reset_detected = NULL WHERE id = ?1",
        [record.id],
    )
    .ctx("cannot start a new epoch")?;
    // Without a health answer the new identity is unknown: forget the pre-reset one, so the
    // next answer is recorded instead of being taken for another reset.
    let meta = now_meta.cloned().unwrap_or_default();
    tx.execute(
        "UPDATE targets SET server_instance_id = ?2, deployment_id = ?3, environment_name = ?4, git_sha = ?5 WHERE id = ?1",
        params![record.id, meta.server_instance_id, meta.deployment_id, meta.environment_name, meta.git_sha],
    )
    .ctx("cannot record the new server identity")?;
    crate::store::stats::rebuild(&tx)?;
    let purged: i64 =
        tx.query_row("SELECT count(*) FROM events WHERE state = 2", [], |r| r.get(0)).ctx("cannot read the journal")?;
    tx.commit().ctx("cannot commit the re-drain")?;
    Ok(purged)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(instance: Option<&str>, env: Option<&str>, deploy: Option<&str>) -> DeploymentMetadata {
        DeploymentMetadata {
            server_instance_id: instance.map(Into::into),
            environment_name: env.map(Into::into),
            deployment_id: deploy.map(Into::into),
            git_sha: None,
        }
    }

    #[test]
    fn stable_fields_decide() {
        let before = meta(Some("i1"), Some("preview"), Some("d1"));
        assert!(detect(&before, &meta(Some("i1"), Some("preview"), Some("d2"))).is_none(), "redeploy only");
        assert!(detect(&before, &meta(None, None, None)).is_none(), "no metadata now");
        assert!(detect(&meta(None, None, None), &before).is_none(), "nothing recorded before");
        let reset = detect(&before, &meta(Some("i2"), Some("preview"), Some("d1"))).unwrap();
        assert_eq!(reset.changed_fields, vec!["server_instance_id: i1 → i2"]);
        let env = detect(&before, &meta(Some("i1"), Some("staging"), Some("d1"))).unwrap();
        assert!(env.changed_fields[0].starts_with("environment_name"));
        let round: ResetDetected = serde_json::from_str(&serde_json::to_string(&reset).unwrap()).unwrap();
        assert_eq!(round, reset);
    }
}

//! `kitty-sync target list` (contract §9): every active target (the mode's primary, then the
//! enabled named targets in config order), then the known inactive ones (disabled, removed,
//! earlier primaries), each with its ledger counts. Read-only.

use rusqlite::types::Value;
use rusqlite::{OptionalExtension, params_from_iter};
use serde::Serialize;

use crate::clock::rfc3339_ms;
use crate::delivery::target::{self, TargetIdentity, TargetKind, TargetRecord};
use crate::error::{Result, StoreContext};
use crate::home::Home;
use crate::store::Store;
use crate::store::selection::{held_sql, settled_sql};
use crate::store::stats;
use crate::targets_config::{NamedTarget, PRIMARY};

#[derive(Debug, Clone, Serialize)]
pub struct TargetListEntry {
    /// `"primary"` for the mode's target; `null` for a known target no longer configured.
    pub name: Option<String>,
    pub enabled: bool,
    pub active: bool,
    pub kind: TargetKind,
    pub target_id: String,
    pub canonical_url: String,
    /// `null`: every event type.
    pub types: Option<Vec<String>>,
    pub delivered_count: i64,
    pub undelivered_count: i64,
    pub parked_count: i64,
    pub rejected_count: i64,
    pub last_success_at: Option<String>,
    pub last_failure_at: Option<String>,
    pub last_error: Option<String>,
}

/// The mode's own target, when the mode delivers.
pub struct PrimaryTarget<'a> {
    pub identity: &'a TargetIdentity,
    /// Team isolation (Teamspace): only events captured without a team or with this one.
    pub team: Option<&'a str>,
}

/// A target as configured now, before its numbers are looked up.
struct Configured {
    name: Option<String>,
    identity: TargetIdentity,
    team: Option<String>,
    types: Option<Vec<String>>,
    enabled: bool,
    active: bool,
}

pub fn named_identity(target: &NamedTarget) -> TargetIdentity {
    TargetIdentity {
        kind: TargetKind::External,
        canonical_url: target.endpoint.canonical.clone(),
        team_slug: String::new(),
        user_email: String::new(),
    }
}

/// Builds the list. A home without a store lists the configured targets with zero counts.
pub fn list(home: &Home, primary: Option<PrimaryTarget<'_>>, named: &[NamedTarget]) -> Result<Vec<TargetListEntry>> {
    let store = Store::open_read_only(home)?;
    let records = match &store {
        Some(store) => target::list(store.conn())?,
        None => Vec::new(),
    };
    let mut configured: Vec<Configured> = Vec::new();
    if let Some(p) = primary {
        configured.push(Configured {
            name: Some(PRIMARY.to_string()),
            identity: p.identity.clone(),
            team: p.team.map(str::to_string),
            types: None,
            enabled: true,
            active: true,
        });
    }
    let (enabled, disabled): (Vec<&NamedTarget>, Vec<&NamedTarget>) = named.iter().partition(|t| t.enabled);
    for t in enabled.into_iter().chain(disabled) {
        configured.push(Configured {
            name: Some(t.name.clone()),
            identity: named_identity(t),
            team: None,
            types: t.types.clone(),
            enabled: t.enabled,
            active: t.enabled,
        });
    }
    for record in &records {
        let team = (record.identity.kind == TargetKind::Teamspace).then(|| record.identity.team_slug.clone());
        configured.push(Configured {
            name: None,
            identity: record.identity.clone(),
            team,
            types: None,
            enabled: false,
            active: false,
        });
    }
    let mut out: Vec<TargetListEntry> = Vec::new();
    for c in configured {
        let target_id = c.identity.target_id();
        // One identity is one target: listed once, under its first (active) configuration.
        if out.iter().any(|e| e.target_id == target_id) {
            continue;
        }
        let record = records.iter().find(|r| r.identity == c.identity);
        out.push(entry(store.as_ref(), record, c)?);
    }
    Ok(out)
}

fn entry(store: Option<&Store>, record: Option<&TargetRecord>, c: Configured) -> Result<TargetListEntry> {
    let mut e = TargetListEntry {
        name: c.name,
        enabled: c.enabled,
        active: c.active,
        kind: c.identity.kind,
        target_id: c.identity.target_id(),
        canonical_url: c.identity.canonical_url.clone(),
        types: c.types,
        delivered_count: 0,
        undelivered_count: 0,
        parked_count: 0,
        rejected_count: 0,
        last_success_at: None,
        last_failure_at: None,
        last_error: None,
    };
    let Some(store) = store else { return Ok(e) };
    e.undelivered_count = undelivered(store, record, c.team.as_deref(), e.types.as_deref())?;
    let Some(record) = record else { return Ok(e) };
    let counts = stats::target_counters(store.conn(), record.id, record.epoch)?;
    e.delivered_count = counts.delivered();
    e.parked_count = counts.terminal_failed;
    e.rejected_count = counts.rejected;
    let conn = store.conn();
    // Drains deliver in capture order, so the latest event received is (but for a later
    // `retry` of an older one) the latest success: a backward seek on the ledger's key instead
    // of a max() over every delivered row (a second per target at a million events).
    e.last_success_at = conn
        .query_row(
            "SELECT completed_at FROM ledger WHERE target = ?1 AND epoch = ?2 AND status IN ('success', 'duplicate')
             ORDER BY seq DESC LIMIT 1",
            [record.id, record.epoch],
            |r| r.get::<_, Option<i64>>(0),
        )
        .optional()
        .ctx("cannot read the ledger")?
        .flatten()
        .map(rfc3339_ms);
    // The ledger keeps each (event, target)'s latest attempt: a failure still standing. The
    // status index holds only those rows (the planner otherwise walks the whole ledger).
    let failure: Option<(i64, Option<String>)> = conn
        .query_row(
            "SELECT last_attempted_at, last_error FROM ledger INDEXED BY ledger_by_status
             WHERE target = ?1 AND epoch = ?2 AND status IN ('failed_transient', 'rejected', 'terminal_failed')
               AND last_attempted_at IS NOT NULL
             ORDER BY last_attempted_at DESC LIMIT 1",
            [record.id, record.epoch],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
        .ctx("cannot read the ledger")?;
    if let Some((at, error)) = failure {
        e.last_failure_at = Some(rfc3339_ms(at));
        e.last_error = error;
    }
    Ok(e)
}

/// Retained events (not coalesced away, of the target's team and types) the target has not
/// received: due above its high-water mark, plus parked or finally rejected below it.
fn undelivered(
    store: &Store,
    record: Option<&TargetRecord>,
    team: Option<&str>,
    types: Option<&[String]>,
) -> Result<i64> {
    let Some(types) = types else {
        let counters = stats::journal_counters(store.conn())?;
        return crate::status::undelivered(store, record, team, &counters);
    };
    if types.is_empty() {
        return Ok(0);
    }
    let marks = vec!["?"; types.len()].join(", ");
    let mut values: Vec<Value> = types.iter().map(|t| Value::Text(t.clone())).collect();
    let mut due = format!(
        "SELECT count(*) FROM events AS e WHERE e.event_type IN ({marks}) AND +e.state = 0 AND e.coalesced_into IS NULL"
    );
    if let Some(team) = team {
        due.push_str(" AND (e.capture_team IS NULL OR e.capture_team = ?)");
        values.push(Value::Text(team.to_string()));
    }
    let count = |sql: &str, values: &[Value]| -> Result<i64> {
        store.conn().query_row(sql, params_from_iter(values), |r| r.get(0)).ctx("cannot count undelivered events")
    };
    let Some(record) = record else { return count(&due, &values) };
    due.push_str(concat!(
        " AND e.seq >= ? AND NOT EXISTS (SELECT 1 FROM ledger AS l WHERE l.target = ? AND l.epoch = ? AND l.seq = e.seq
            AND ",
        settled_sql!("l"),
        ")"
    ));
    let due_count =
        count(&due, &[values, vec![record.due_from_seq.into(), record.id.into(), record.epoch.into()]].concat())?;
    let stuck = format!(
        concat!(
            "SELECT count(*) FROM ledger AS l JOIN events AS e ON e.seq = l.seq
         WHERE l.target = ? AND l.epoch = ? AND ",
            held_sql!("l"),
            " AND e.state = 0 AND e.coalesced_into IS NULL AND e.event_type IN ({marks})"
        ),
        marks = marks
    );
    let stuck_values: Vec<Value> =
        [vec![record.id.into(), record.epoch.into()], types.iter().map(|t| Value::Text(t.clone())).collect()].concat();
    Ok(due_count + count(&stuck, &stuck_values)?)
}

//! Which targets a delivery run goes to (contract §9): the mode's primary when the mode
//! delivers, then the enabled named targets in config order, or only those named with
//! `--target`.

use std::time::Duration;

use kitty_sync::Error;
use kitty_sync::delivery::dispatcher::DrainSummary;
use kitty_sync::delivery::fanout::{FanTarget, empty_summary};
use kitty_sync::delivery::receiver::{ExternalReceiver, HttpClient, Receiver, TeamspaceReceiver};
use kitty_sync::delivery::target::TargetIdentity;
use kitty_sync::mode::EventSyncMode;
use kitty_sync::targets_config::{NamedTarget, PRIMARY};

use super::Context;
use crate::output::Printer;

pub struct Plan {
    pub targets: Vec<FanTarget>,
    /// Whether the primary is among `targets`.
    pub has_primary: bool,
    /// The primary's identity, also when it is not delivered to (for the §7 keys).
    primary_identity: Option<TargetIdentity>,
}

impl Plan {
    /// Zero counts naming the primary target.
    pub fn primary_summary(&self) -> DrainSummary {
        empty_summary(&self.primary_identity.clone().unwrap_or_else(|| TargetIdentity {
            kind: kitty_sync::delivery::target::TargetKind::Teamspace,
            canonical_url: String::new(),
            team_slug: String::new(),
            user_email: String::new(),
        }))
    }
}

/// The targets to deliver to. `wanted` empty: every active target; an unknown or disabled
/// name, or `primary` in a mode that delivers nowhere, is a usage error (exit 2).
pub fn plan(
    ctx: &Context,
    mode: EventSyncMode,
    wanted: &[String],
    timeout: Duration,
    printer: &Printer,
) -> kitty_sync::Result<Plan> {
    let named = ctx.config.named_targets.get()?;
    check_wanted(mode, named, wanted)?;
    let picked = |name: &str| wanted.is_empty() || wanted.iter().any(|w| w == name);
    let mut targets = Vec::new();
    let primary_identity = if mode.delivers() {
        if picked(PRIMARY) {
            ctx.check_delivery(mode)?;
        }
        match super::target::active_receiver(ctx, mode, timeout, printer)? {
            Some(receiver) => {
                let identity = receiver.identity().clone();
                if picked(PRIMARY) {
                    targets.push(FanTarget { name: PRIMARY.to_string(), receiver, types: None });
                }
                Some(identity)
            }
            None => None,
        }
    } else {
        let client = HttpClient::new(timeout);
        TeamspaceReceiver::new(&ctx.home, &ctx.authority, &ctx.credentials, client).ok().map(|r| r.identity().clone())
    };
    let has_primary = !targets.is_empty();
    for target in named.iter().filter(|t| t.enabled && picked(&t.name)) {
        targets.push(named_target(target, timeout, printer)?);
    }
    Ok(Plan { targets, has_primary, primary_identity })
}

fn named_target(target: &NamedTarget, timeout: Duration, printer: &Printer) -> kitty_sync::Result<FanTarget> {
    let receiver =
        ExternalReceiver::new(Some(&target.endpoint.raw), target.token_env.as_deref(), HttpClient::new(timeout))?;
    if let Some(var) = receiver.missing_token_env() {
        printer.warn(format!("{var} (the token_env of target {}) is not set; posting without a token", target.name));
    }
    Ok(FanTarget { name: target.name.clone(), receiver: Box::new(receiver), types: target.types.clone() })
}

fn check_wanted(mode: EventSyncMode, named: &[NamedTarget], wanted: &[String]) -> kitty_sync::Result<()> {
    for name in wanted {
        if name == PRIMARY {
            if !mode.delivers() {
                return Err(Error::usage(
                    format!("event sync mode {mode} has no primary target to deliver to"),
                    "pick a named target (see `kitty-sync target list`), or set a delivering mode with `kitty-sync mode`",
                ));
            }
            continue;
        }
        match named.iter().find(|t| &t.name == name) {
            Some(t) if t.enabled => {}
            Some(_) => {
                return Err(Error::usage(
                    format!("target {name:?} is disabled"),
                    format!("enable it first with `kitty-sync target enable {name}`"),
                ));
            }
            None => {
                return Err(Error::usage(
                    format!("no target named {name:?}"),
                    "see the targets with `kitty-sync target list` (`primary` is the mode's own target)",
                ));
            }
        }
    }
    Ok(())
}

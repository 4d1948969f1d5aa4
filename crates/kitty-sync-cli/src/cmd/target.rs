//! The active receiver for the configured mode: one place that turns mode + config + the
//! target authority into a `Receiver`.

use std::time::Duration;

use kitty_sync::delivery::receiver::{ExternalReceiver, HttpClient, Receiver, TeamspaceReceiver};
use kitty_sync::mode::EventSyncMode;

use super::Context;
use crate::output::Printer;

/// `None` for modes that deliver nowhere.
pub fn active_receiver(
    ctx: &Context,
    mode: EventSyncMode,
    timeout: Duration,
    printer: &Printer,
) -> kitty_sync::Result<Option<Box<dyn Receiver + Send>>> {
    let client = HttpClient::new(timeout);
    match mode {
        EventSyncMode::Teamspace => {
            ctx.warn_authority(printer);
            Ok(Some(Box::new(TeamspaceReceiver::new(&ctx.home, &ctx.authority, &ctx.credentials, client)?)))
        }
        EventSyncMode::ExternalReceiver => {
            let receiver = ExternalReceiver::new(
                ctx.config.external_endpoint.as_deref(),
                ctx.config.external_token_env.as_deref(),
                client,
            )?;
            if let Some(var) = receiver.missing_token_env() {
                printer.warn(format!("{var} (the configured external_token_env) is not set; posting without a token"));
            }
            Ok(Some(Box::new(receiver)))
        }
        EventSyncMode::LocalRetention | EventSyncMode::OptOut => Ok(None),
    }
}

//! Delivery: targets, the per-event × per-target ledger, receivers, and the drain.

pub mod dispatcher;
pub mod lock;
pub mod receiver;
pub mod reset;
pub mod retention;
pub mod retry;
pub mod target;
pub mod wire;

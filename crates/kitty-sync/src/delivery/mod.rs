//! Delivery: targets, the per-event × per-target ledger, receivers, and the drain.

pub mod backoff;
pub mod batch;
pub mod dispatcher;
pub mod fanout;
pub mod ledger;
pub mod lock;
pub mod receiver;
pub mod reset;
pub mod retention;
pub mod retry;
pub mod target;
pub mod wire;

#[cfg(test)]
mod model_tests;
#[cfg(test)]
mod scripted;

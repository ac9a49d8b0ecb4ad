//! meshcanary: node-local canary analysis and rollback for Envoy meshes.
//!
//! One module per stage of the data flow (see `docs/architecture.md`):
//! [`discover`] -> [`scrape`] -> [`parse`] -> [`window`], wired by [`agent`], observed through
//! [`telemetry`] and [`watch`]. [`config`] holds the small value parsers and [`cli`] the
//! command line.
#![forbid(unsafe_code)]

pub mod agent;
pub mod alert;
pub mod analysis;
pub mod annotations;
pub mod canary;
pub mod cli;
pub mod clock;
pub mod config;
pub mod controller;
pub mod discover;
pub mod judge;
pub mod parse;
pub mod peers;
pub mod placement;
pub mod remote_write;
pub mod rollout;
pub mod router;
pub mod scrape;
pub mod shutdown;
pub mod simulate;
pub mod statsd;
pub mod telemetry;
pub mod watch;
pub mod webhook;
pub mod window;
pub mod workload;

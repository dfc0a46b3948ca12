//! `tandemctl`'s commands as a library, so that tests can run them (the benchmark harness's short
//! form runs in CI): the demo, the benchmark harness, CSV import, and what they share.

pub mod bench;
pub mod ceilings;
pub mod client;
pub mod demo;
pub mod demo_settlement;
pub mod import;
pub mod network;
pub mod process;
pub mod receiver;
pub mod settlement_bench;
pub mod soak;
pub mod statements;
pub mod trace;
pub mod webhook_bench;
pub mod webhooks;

//! Prometheus metrics and the health endpoints (`/metrics`, `/healthz`, `/readyz`): what the
//! agent records (`registry`) and the server that shows it (`server`).

mod registry;
mod server;

pub use registry::Metrics;
pub use server::{DEFAULT_BIND, IDLE_TIMEOUT, MAX_CONNECTION_AGE, MAX_CONNECTIONS, router, serve};

use clap::Parser;
use kube_netpol_iptables::app;
use kube_netpol_iptables::cli::{Cli, LogFormat};
use kube_netpol_iptables::source::kube::DEFAULT_LOG_FILTER;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER)),
        )
        .with_writer(std::io::stderr);
    match cli.log_format {
        // One JSON object a line, its fields at the top level.
        LogFormat::Json => logs.json().flatten_event(true).init(),
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
    let json = cli.log_format == LogFormat::Json;
    match cli.into_config().and_then(app::run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if json => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

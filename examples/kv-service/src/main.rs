//! `endophyte-kv`: the example key-value service (see the crate docs).

use clap::Parser;

/// An example Endophyte service: a key-value store that follows its VM's epochs, migrations and
/// promotes.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    opts: endophyte_kv_service::Opts,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = endophyte_kv_service::run(Cli::parse().opts) {
        eprintln!("endophyte-kv: {e:#}");
        std::process::exit(1);
    }
}

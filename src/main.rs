//! The `fanout` command line: `serve` (the default), `token`, `check-token`.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use fanout::auth::Verifier;
use fanout::config::{LogFormat, ServeArgs};

#[derive(Parser)]
#[command(
    name = "fanout",
    version,
    about = "Horizontally scalable WebSocket fan-out for chat, routed per user over MQTT",
    long_about = "Horizontally scalable WebSocket fan-out for chat, routed per user over MQTT.\n\n\
        With no subcommand, runs the service (same as `fanout serve`). Without --mqtt-url it \
        starts an embedded development broker; in production point --mqtt-url at Mosquitto, \
        EMQX or VerneMQ.",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the service (the default).
    Serve(ServeArgs),
    /// Print a signed HS256 token for USER_ID, using the same secret settings as `serve`.
    Token {
        /// The user id (the token's `sub`).
        user_id: String,
        /// Lifetime, e.g. 30s, 15m, 1h, 7d.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Space-separated scopes, e.g. `broadcast` (allows sending to all participants).
        #[arg(long)]
        scope: Option<String>,
        #[command(flatten)]
        settings: ServeArgs,
    },
    /// Say whether this configuration would accept JWT, and why not. Exit 0 if accepted, 1 if not.
    CheckToken {
        /// The token to check.
        jwt: String,
        #[command(flatten)]
        settings: ServeArgs,
    },
}

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,rumqttd=off,rumqttc=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).with_span_list(false).init(),
    }
}

/// The token verifier of the configuration `token` and `check-token` were given.
fn verifier(settings: ServeArgs) -> Result<Verifier, ExitCode> {
    let cfg = settings.validate().map_err(config_error)?;
    Verifier::new(&cfg.auth).map_err(config_error)
}

fn config_error(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("fanout: {e}");
    ExitCode::from(2)
}

/// A command line clap cannot parse: its first line (what is wrong, naming the flag) and, for
/// a mistyped flag, the one it resembles. Bad configuration is one line (docs/protocol.md §10.4).
fn usage_error(e: &clap::Error) -> ExitCode {
    use clap::error::{ContextKind, ContextValue};
    let text = e.render().to_string();
    let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("error: invalid arguments");
    let hint = match e.get(ContextKind::SuggestedArg) {
        Some(ContextValue::String(s)) => format!("; did you mean {s}?"),
        _ => String::new(),
    };
    eprintln!("{first}{hint} (fanout --help lists every flag)");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        // --help and --version are not errors.
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => return usage_error(&e),
    };
    match cli.cmd {
        None => serve(cli.serve),
        Some(Cmd::Serve(args)) => serve(args),
        Some(Cmd::Token { user_id, ttl, scope, settings }) => {
            let verifier = match verifier(settings) {
                Ok(v) => v,
                Err(code) => return code,
            };
            match verifier.mint(&user_id, ttl, scope.as_deref()) {
                Ok(t) => {
                    println!("{t}");
                    ExitCode::SUCCESS
                }
                Err(e) => config_error(e),
            }
        }
        Some(Cmd::CheckToken { jwt, settings }) => {
            let verifier = match verifier(settings) {
                Ok(v) => v,
                Err(code) => return code,
            };
            match verifier.verify(&jwt) {
                Ok(id) => {
                    let left = id.expires_at.saturating_sub(fanout::clock::unix_now());
                    println!(
                        "accepted: user {:?}, expires in {}, broadcast scope: {}",
                        id.user_id,
                        humantime::format_duration(Duration::from_secs(left)),
                        if id.broadcast { "yes" } else { "no" }
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    println!("rejected: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    let cfg = match args.validate() {
        Ok(c) => c,
        Err(e) => return config_error(e),
    };
    init_tracing(cfg.log_format);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if cfg.worker_threads > 0 {
        builder.worker_threads(cfg.worker_threads);
    }
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fanout: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(fanout::server::serve(cfg, fanout::server::signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fanout: {e}");
            ExitCode::FAILURE
        }
    }
}

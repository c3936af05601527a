//! The `cceb` binary: `serve` runs the bridge, `token` mints a client token,
//! `client` speaks to a bridge from a terminal or a script (JSON lines),
//! `asyncapi` prints the AsyncAPI document of the client WebSocket.

use anyhow::Context;
use cceb::config::{LogFormat, Settings};
use cceb::Bridge;
use cceb_token::{mint_hs256, TokenRequest};
use clap::{Parser, Subcommand};
use rand::distr::{Alphanumeric, SampleString};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "cceb", version, about = "Client Connector Events Bridge")]
struct Cli {
    /// TOML settings file; CCEB_* environment variables override it.
    #[arg(long, global = true, env = "CCEB_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the bridge (embedded bus and store unless configured otherwise).
    Serve {
        /// Generate a JWT secret and an admin token when none is configured, and print them;
        /// the console (`/console/`) may mint client tokens.
        #[arg(long)]
        dev: bool,
    },
    /// Mint an HS256 client token from the configured secret.
    Token {
        #[arg(long)]
        agent: String,
        #[arg(long)]
        tenant: String,
        #[arg(long, default_value = "ir-1")]
        ir: String,
        #[arg(long)]
        contact_id: Option<String>,
        /// Lifetime, e.g. 30s, 15m, 1h, 2d.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
    /// Connect as an agent: print each notification as a JSON line on stdout
    /// (acked once printed), send each stdin line `{"action": NAME, "details":
    /// {...}, "uuid": optional}` as an action and print `{"ack": UUID}` or
    /// `{"error": {...}}`. Connection states go to stderr.
    Client {
        /// Discovery (`http://HOST/v1/discovery`) or the endpoint itself (`ws://HOST/ws/v1`).
        #[arg(long, default_value = "http://127.0.0.1:8080/v1/discovery")]
        url: String,
        /// Client token (JWT), e.g. from `cceb token`.
        #[arg(long, env = "CCEB_CLIENT_TOKEN")]
        token: String,
        /// Open a long-lived session (resumed with its key after a reconnect).
        #[arg(long)]
        long_lived: bool,
    },
    /// Print the AsyncAPI 3.0 document of the client WebSocket for the
    /// configured schema set (CCEB_SCHEMA_DIR, else the built-in one): what
    /// `GET /v1/asyncapi.json` serves, and `docs/asyncapi.json`.
    Asyncapi,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cceb: {e}");
            // EX_CONFIG: the settings are wrong, retrying will not help.
            return ExitCode::from(78);
        }
    };
    let result = match cli.command {
        Command::Serve { dev } => serve(settings, dev),
        Command::Client { url, token, long_lived } => client(url, token, long_lived),
        Command::Asyncapi => asyncapi(&settings),
        Command::Token { agent, tenant, ir, contact_id, ttl } => token(
            &settings,
            TokenRequest {
                tenant_guid: &tenant,
                agent_guid: &agent,
                ir_instance: &ir,
                contact_id: contact_id.as_deref(),
                ttl,
            },
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cceb: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn asyncapi(settings: &Settings) -> anyhow::Result<()> {
    let set = cceb::schema::SchemaSet::load(settings.schema_dir.as_deref())?;
    println!("{}", serde_json::to_string_pretty(&cceb::asyncapi::document(&set))?);
    Ok(())
}

fn token(settings: &Settings, req: TokenRequest<'_>) -> anyhow::Result<()> {
    let secret = settings.jwt_hs256_secret.as_deref().context("CCEB_JWT_HS256_SECRET is not set")?;
    println!("{}", mint_hs256(secret, &req)?);
    Ok(())
}

fn client(url: String, token: String, long_lived: bool) -> anyhow::Result<()> {
    use cceb_client::{ActionError, Client, Event};
    use serde_json::{json, Value};
    use tokio::io::AsyncBufReadExt;

    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let (client, mut events) = Client::builder(url)
            .token(token)
            .long_lived(long_lived)
            .client_info("cceb-cli", env!("CARGO_PKG_VERSION"))
            .build();
        let signals = signals()?;
        let stop = client.clone();
        tokio::spawn(async move {
            signals.await;
            stop.close();
        });
        let actions = client.clone();
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
            // Stdin at its end: keep printing notifications until a signal or a close.
            while let Ok(Some(line)) = lines.next_line().await {
                if line.trim().is_empty() {
                    continue;
                }
                let req: Value = match serde_json::from_str(&line) {
                    Ok(v) => v,
                    Err(e) => {
                        println!("{}", json!({"error": {"message": format!("not JSON: {e}")}}));
                        continue;
                    }
                };
                let Some(name) = req["action"].as_str().map(str::to_owned) else {
                    println!("{}", json!({"error": {"message": "`action` (a string) is missing"}}));
                    continue;
                };
                let uuid = req["uuid"].as_str().map_or_else(cceb_client::new_uuid, str::to_owned);
                let details = req.get("details").cloned().unwrap_or(Value::Null);
                let client = actions.clone();
                // Each action on its own task: the client keeps their order on the wire.
                tokio::spawn(async move {
                    let line = match client.action_with_uuid(&uuid, &name, details).await {
                        Ok(()) => json!({"ack": uuid}),
                        Err(ActionError::Refused { code, message, field }) => {
                            json!({"error": {"uuid": uuid, "code": code, "message": message, "field": field}})
                        }
                        Err(e) => json!({"error": {"uuid": uuid, "message": e.to_string()}}),
                    };
                    println!("{line}");
                });
            }
        });
        while let Some(event) = events.recv().await {
            match event {
                Event::Notification(n) => {
                    println!("{}", json!({"type": n.ty, "uuid": n.uuid, "seq": n.seq, "data": n.data}));
                    // Dropped here: acked once printed.
                }
                Event::State(s) => eprintln!("cceb client: {s:?}"),
                Event::Closed { code: Some(1000), .. } => return Ok(()),
                Event::Closed { code, reason } => anyhow::bail!("closed ({code:?}): {reason}"),
            }
        }
        Ok(())
    })
}

fn serve(mut settings: Settings, dev: bool) -> anyhow::Result<()> {
    init_logging(&settings);
    let mut console_token = None;
    if dev {
        let random = || Alphanumeric.sample_string(&mut rand::rng(), 32);
        let (own_secret, own_admin) = (settings.jwt_hs256_secret.is_none(), settings.admin_token.is_none());
        let secret = settings.jwt_hs256_secret.get_or_insert_with(random).clone();
        let admin = settings.admin_token.get_or_insert_with(random).clone();
        // The console mints tokens for anyone who reaches it: only with a
        // secret made for this run, and only on a loopback address.
        settings.dev = own_secret && settings.listen.ip().is_loopback();
        let example = mint_hs256(
            &secret,
            &TokenRequest {
                tenant_guid: "tenant-1",
                agent_guid: "agent-1",
                ir_instance: "ir-1",
                contact_id: Some("1001"),
                ttl: Duration::from_secs(3600),
            },
        )?;
        let shown = |own: bool, value: &str| if own { value.to_owned() } else { "(configured, not shown)".into() };
        println!("cceb --dev");
        println!("  CCEB_JWT_HS256_SECRET={}", shown(own_secret, &secret));
        println!("  CCEB_ADMIN_TOKEN={}", shown(own_admin, &admin));
        if !settings.dev {
            println!("  the console does not mint tokens: the secret is configured or the listener is not loopback");
        }
        println!("  a client token for tenant-1/agent-1, valid 1h:\n  {example}");
        console_token = Some(example);
    }
    if !settings.has_jwt_key() {
        anyhow::bail!(
            "no client token key: set CCEB_JWT_HS256_SECRET (or a public key file, a JWKS file or URL), or run with --dev"
        );
    }
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let bridge = Bridge::start(settings).await?;
        // Handlers first: a SIGTERM right after the listening line must drain, not kill.
        let signals = signals()?;
        let stop = bridge.shutdown_token();
        tokio::spawn(async move {
            signals.await;
            tracing::info!("signal received, draining");
            stop.cancel();
        });
        if let Some(token) = console_token {
            println!("  the console, signed in as tenant-1/agent-1 (it mints more tokens in --dev):");
            println!("  http://{}/console/#token={token}", bridge.addr);
        }
        match bridge.backend_addr {
            Some(b) => println!("listening on {} (backend port {b})", bridge.addr),
            None => println!("listening on {} (bus kafka)", bridge.addr),
        }
        bridge.run_until_stopped().await;
        anyhow::Ok(())
    })
}

/// Installs the SIGTERM and SIGINT handlers now; the future resolves on either.
fn signals() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut term, mut int) = (signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?);
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

fn init_logging(settings: &Settings) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_new(&settings.log).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match settings.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

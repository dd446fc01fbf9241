//! `spillway demo`: replays the start-up flood that kept the user's machine
//! from ever reporting healthy, through spillway, and says what happened.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use spillway::{BatchingBus, Config, Engine, MessageBus};

use crate::flood::{self, FloodSpec};

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Events the flood publishes (3/4 code-index files, 1/4 ORM rows).
    #[arg(long, default_value_t = 200_000)]
    pub events: usize,
    /// Keep health checks and chat going at least this many seconds.
    #[arg(long, default_value_t = 2.0)]
    pub seconds: f64,
    /// Data directory (created if missing).
    #[arg(long, default_value = "spillway-data")]
    pub dir: PathBuf,
    /// Configuration file (TOML); defaults apply to everything it leaves out.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

pub fn run(args: &DemoArgs) -> anyhow::Result<()> {
    let config = match &args.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    crate::create_private_dir(&args.dir)?;
    let (engine, guard) = Engine::builder(config.batch)
        .build()
        .context("starting the engine")?;
    let bus = Arc::new(BatchingBus::new(&engine, Arc::new(MessageBus::new())));
    let spec = FloodSpec {
        files: args.events * 3 / 4,
        rows: args.events - args.events * 3 / 4,
        min_duration: Duration::from_secs_f64(args.seconds.max(0.0)),
    };
    println!(
        "spillway demo: a code indexer announces {} files and an ORM writes {} rows as fast as they can,\n\
         while chat runs every 20 ms and a health check is sent every 10 ms (passthrough).",
        spec.files, spec.rows
    );
    let r = flood::run(bus.clone(), &spec);
    let stats = engine.stats();
    drop(guard);
    println!();
    println!("  events published       {:>12}", r.published);
    println!("  batches closed         {:>12}", stats.total.batches);
    println!(
        "  subscriber calls       {:>12}   (a per-event bus makes one per event per subscriber: {})",
        r.calls, r.delivered
    );
    println!("  dispatch reduction     {:>11.1}x", r.reduction());
    println!(
        "  health checks          {:>12}   answered {}/{}, latency p50 {:.0} us, p99 {:.0} us, max {:.0} us",
        "",
        r.health_answered,
        r.health_sent,
        r.health_p50_us,
        r.health_p99_us,
        r.health_max_us
    );
    println!("  dropped                {:>12}", stats.total.dropped);
    println!(
        "  elapsed                {:>11.2}s",
        r.elapsed.as_secs_f64()
    );
    println!("  data directory         {}", args.dir.display());
    Ok(())
}

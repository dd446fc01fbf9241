//! `spillway reindex DIR`: rebuilds `index.db` from the segment files.
//!
//! Builds a new database next to the old one and renames it over it, so the
//! old index stays usable until the new one is complete. Refuses while a
//! running service has the index open.

use std::path::PathBuf;

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use spillway::sinks::index::{reindex, IndexConfig, INDEX_FILE};

/// Arguments of `spillway reindex`.
#[derive(clap::Args, Debug)]
pub struct ReindexArgs {
    /// The data directory (holds `segments/`; `index.db` is rebuilt there).
    #[arg(default_value = "./spillway-data")]
    pub dir: PathBuf,
}

/// Runs `spillway reindex`, with a progress bar (compressed bytes) on stderr.
pub fn run(args: &ReindexArgs) -> Result<()> {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} ({bytes_per_sec}, {eta} left)",
        )?,
    );
    let progress = reindex(&args.dir, &IndexConfig::default(), &mut |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    });
    bar.finish_and_clear();
    let p = progress?;
    eprintln!(
        "reindexed {} records from {} frames into {}",
        p.records,
        p.frames,
        args.dir.join(INDEX_FILE).display()
    );
    if p.damaged_frames > 0 || p.bad_lines > 0 {
        eprintln!(
            "skipped {} damaged frames and {} unreadable lines:",
            p.damaged_frames, p.bad_lines
        );
        for problem in &p.problems {
            eprintln!("  {problem}");
        }
    }
    Ok(())
}

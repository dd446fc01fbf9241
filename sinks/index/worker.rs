//! The background indexer thread.
//!
//! It follows the segment files like `tail -f`: a pass indexes what is new,
//! then it sleeps [`IndexConfig::poll_interval`] (or until
//! [`IndexerHandle::catch_up_now`] asks for a pass). The index is never
//! allowed to take the service down: when `index.db` is locked, unwritable,
//! or from a newer schema, the thread prints one line on stderr, counts the
//! failure in its [`IndexerStatus`], backs off (doubling up to
//! [`IndexConfig::max_backoff`]) and retries, resuming from its checkpoints.
//! A corrupt `index.db` is moved aside as `index.db.corrupt-<unix-seconds>`
//! and rebuilt from the segments, which are the source of truth.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::sinks::index::config::IndexConfig;
use crate::sinks::index::indexer::{with_suffix, Index, Lag};
use crate::sinks::index::schema::{is_corrupt, INDEX_FILE};

/// The first pause after a failure; doubled on each further failure.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// What the background indexer has done, for `stats` and health checks.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct IndexerStatus {
    /// Rows inserted since the thread started.
    pub records: u64,
    /// Transactions committed since the thread started.
    pub transactions: u64,
    /// Passes completed without error.
    pub passes: u64,
    /// Whether the last attempt succeeded.
    pub healthy: bool,
    /// Failed attempts (each is retried after a back-off).
    pub errors: u64,
    /// The most recent failure.
    pub last_error: Option<String>,
    /// Corrupt index files moved aside (then rebuilt from the segments).
    pub moved_aside: Vec<PathBuf>,
    /// Damaged frames skipped.
    pub damaged_frames: u64,
    /// Lines that could not be indexed.
    pub bad_lines: u64,
    /// The latest damaged frame or unreadable line, with file and offset.
    pub last_problem: Option<String>,
    /// How far behind the segments the index was after the last pass.
    pub lag: Lag,
}

/// Starts background indexers.
#[derive(Debug)]
pub struct Indexer;

impl Indexer {
    /// Starts a thread that keeps `DIR/index.db` up to date with the segment
    /// files under `DIR`. Opening the index happens on the thread (a broken
    /// index is reported in the status, not here); only an invalid `config`
    /// or a failure to start the thread is an error.
    pub fn spawn(data_dir: impl AsRef<Path>, config: IndexConfig) -> Result<IndexerHandle> {
        config.validate()?;
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            state: Mutex::new(State::default()),
            cv: Condvar::new(),
        });
        let (done_tx, done_rx) = mpsc::channel();
        let data_dir = data_dir.as_ref().to_path_buf();
        let s = shared.clone();
        let stop_timeout = config.stop_timeout;
        let thread = std::thread::Builder::new()
            .name("spillway-index".into())
            .spawn(move || {
                run(&s, &data_dir, &config);
                let _ = done_tx.send(());
            })
            .map_err(|e| Error::Other(format!("cannot start the indexer thread: {e}")))?;
        Ok(IndexerHandle {
            shared,
            thread: Some(thread),
            done: done_rx,
            stop_timeout,
        })
    }
}

/// The running indexer. Dropping it stops the thread, waiting up to
/// [`IndexConfig::stop_timeout`] for the transaction in progress.
#[must_use = "dropping the handle stops the indexer"]
pub struct IndexerHandle {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    done: mpsc::Receiver<()>,
    stop_timeout: Duration,
}

impl std::fmt::Debug for IndexerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IndexerHandle")
            .field("status", &self.status())
            .finish()
    }
}

impl IndexerHandle {
    /// A snapshot of the counters.
    pub fn status(&self) -> IndexerStatus {
        self.shared.lock().status.clone()
    }

    /// Asks for a pass now and waits until a pass that started after this
    /// call has finished: returns its status, or its error, or an error
    /// after `timeout`.
    pub fn catch_up_now(&self, timeout: Duration) -> Result<IndexerStatus> {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        st.requested += 1;
        let want = st.requested;
        self.shared.cv.notify_all();
        loop {
            if st.finished >= want {
                return match &st.finished_error {
                    None => Ok(st.status.clone()),
                    Some(e) => Err(Error::Other(format!("indexing failed: {e}"))),
                };
            }
            if st.exited {
                return Err(Error::Other("the indexer has stopped".into()));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Other(format!(
                    "the indexer did not finish a pass within {timeout:?}{}",
                    st.status
                        .last_error
                        .as_ref()
                        .map(|e| format!(" (last error: {e})"))
                        .unwrap_or_default()
                )));
            }
            st = self
                .shared
                .cv
                .wait_timeout(st, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }
}

impl Drop for IndexerHandle {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.cv.notify_all();
        if self.done.recv_timeout(self.stop_timeout).is_ok() {
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
        // Otherwise the thread finishes its transaction on its own and exits;
        // anything it had not committed is redone from the checkpoints.
    }
}

struct Shared {
    stop: AtomicBool,
    state: Mutex<State>,
    cv: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Sleeps up to `d`, waking early for a stop or a new request.
    fn sleep(&self, d: Duration, seen_request: u64) {
        let deadline = Instant::now() + d;
        let mut st = self.lock();
        while !self.stopping() && st.requested == seen_request {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            st = self
                .cv
                .wait_timeout(st, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }
}

#[derive(Default)]
struct State {
    /// Passes asked for by `catch_up_now`.
    requested: u64,
    /// The request count seen by the last finished pass.
    finished: u64,
    finished_error: Option<String>,
    exited: bool,
    status: IndexerStatus,
}

fn run(shared: &Shared, data_dir: &Path, config: &IndexConfig) {
    let mut index: Option<Index> = None;
    let mut backoff = FIRST_BACKOFF;
    while !shared.stopping() {
        let seen = shared.lock().requested;
        let result = pass(shared, data_dir, config, &mut index);
        let mut st = shared.lock();
        st.finished = seen;
        match result {
            Ok(lag) => {
                st.status.passes += 1;
                st.status.lag = lag;
                if !st.status.healthy && st.status.errors > 0 {
                    eprintln!(
                        "spillway: indexing {} resumed",
                        data_dir.join(INDEX_FILE).display()
                    );
                }
                st.status.healthy = true;
                st.finished_error = None;
                backoff = FIRST_BACKOFF;
                drop(st);
                shared.cv.notify_all();
                shared.sleep(config.poll_interval, seen);
            }
            Err(e) => {
                let text = e.to_string();
                st.status.errors += 1;
                st.status.last_error = Some(text.clone());
                if st.status.healthy || st.status.errors == 1 {
                    eprintln!("spillway: indexer: {text}; the segments keep everything, retrying in the background");
                }
                st.status.healthy = false;
                st.finished_error = Some(text);
                // A connection that failed may be in any state: start afresh.
                index = None;
                if is_corrupt(&e) {
                    match move_aside(&data_dir.join(INDEX_FILE)) {
                        Ok(to) => {
                            eprintln!(
                                "spillway: moved the corrupt index aside to {}; rebuilding it from the segments",
                                to.display()
                            );
                            st.status.moved_aside.push(to);
                        }
                        Err(e) => st.status.last_error = Some(e.to_string()),
                    }
                }
                drop(st);
                shared.cv.notify_all();
                shared.sleep(backoff, seen);
                backoff = (backoff * 2).min(config.max_backoff);
            }
        }
    }
    shared.lock().exited = true;
    shared.cv.notify_all();
}

/// Opens the index if needed and runs one pass; returns the lag after it.
fn pass(
    shared: &Shared,
    data_dir: &Path,
    config: &IndexConfig,
    index: &mut Option<Index>,
) -> Result<Lag> {
    let idx = match index {
        Some(i) => i,
        None => index.insert(Index::open_with(data_dir, config)?),
    };
    let mut committed = (0, 0);
    let progress = idx.pass(Some(&shared.stop), &mut |p| {
        let mut st = shared.lock();
        st.status.records += p.records - committed.0;
        st.status.transactions += p.transactions - committed.1;
        committed = (p.records, p.transactions);
    })?;
    if let Some(first) = progress.problems.first() {
        let mut st = shared.lock();
        st.status.damaged_frames += progress.damaged_frames;
        st.status.bad_lines += progress.bad_lines;
        st.status.last_problem = Some(first.clone());
        eprintln!(
            "spillway: indexer skipped {} damaged frames and {} unreadable lines (first: {first})",
            progress.damaged_frames, progress.bad_lines
        );
    }
    idx.lag()
}

/// Renames `db` (and its `-wal`) to `<db>.corrupt-<unix-seconds>` and
/// removes its `-shm`; returns the new name.
fn move_aside(db: &Path) -> Result<PathBuf> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut to = with_suffix(db, &format!(".corrupt-{secs}"));
    let mut n = 1;
    while to.exists() {
        to = with_suffix(db, &format!(".corrupt-{secs}-{n}"));
        n += 1;
    }
    std::fs::rename(db, &to).map_err(|e| Error::io("cannot move the corrupt index", db, e))?;
    let wal = with_suffix(db, "-wal");
    if wal.exists() {
        std::fs::rename(&wal, with_suffix(&to, "-wal"))
            .map_err(|e| Error::io("cannot move the corrupt index's WAL", &wal, e))?;
    }
    match std::fs::remove_file(with_suffix(db, "-shm")) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io("cannot remove", with_suffix(db, "-shm"), e)),
    }
    Ok(to)
}

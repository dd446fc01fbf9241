//! The schema of `index.db` and how connections to it are opened.
//!
//! The schema lives in `migrations/*.sql`, embedded at build time and applied
//! in order by `rusqlite_migration`, which records the version in SQLite's
//! `user_version`. A file whose version is newer than this build knows is
//! refused (it belongs to a newer spillway), never downgraded.

use std::fs;
use std::path::Path;

use rusqlite::{Connection, ErrorCode, OpenFlags};
use rusqlite_migration::{Migrations, M};

use crate::error::{Error, Result};
use crate::sinks::index::config::IndexConfig;

/// The file name of the index in the data directory.
pub const INDEX_FILE: &str = "index.db";

/// The schema version this build creates and understands.
pub const SCHEMA_VERSION: usize = MIGRATION_LIST.len();

const MIGRATION_LIST: &[M<'static>] = &[M::up(include_str!("../../migrations/0001_init.sql"))];

fn migrations() -> Migrations<'static> {
    Migrations::from_slice(MIGRATION_LIST)
}

/// Maps a SQLite error to [`Error::Sqlite`] with what was done and on which file.
pub(crate) fn sql_err(action: &'static str, path: &Path) -> impl FnOnce(rusqlite::Error) -> Error {
    let path = path.to_path_buf();
    move |cause| Error::Sqlite {
        action,
        path,
        cause,
    }
}

/// Whether `e` says the database file is not a (healthy) SQLite database.
pub(crate) fn is_corrupt(e: &Error) -> bool {
    match e {
        Error::Sqlite { cause, .. } => matches!(
            cause.sqlite_error_code(),
            Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase)
        ),
        _ => false,
    }
}

/// Creates `dir` (and parents) owner-only if it is missing.
pub(crate) fn ensure_private_dir(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    crate::sinks::segment::create_dir_private(dir)
}

/// Creates an empty owner-only file at `path` unless one exists, so SQLite
/// (which creates files 0644 and gives `-wal`/`-shm` the main file's mode)
/// never makes the index world-readable.
fn ensure_private_file(path: &Path) -> Result<()> {
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    match opts.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(Error::io("cannot create", path, e)),
    }
}

/// Opens (creating if needed) the index at `path` for writing: WAL,
/// `synchronous=NORMAL`, the configured busy timeout and cache, and the
/// schema migrated to [`SCHEMA_VERSION`].
pub(crate) fn open_rw(path: &Path, config: &IndexConfig) -> Result<Connection> {
    if let Some(parent) = path.parent() {
        ensure_private_dir(parent)?;
    }
    ensure_private_file(path)?;
    let mut conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI,
    )
    .map_err(sql_err("cannot open index", path))?;
    conn.busy_timeout(config.busy_timeout)
        .map_err(sql_err("cannot configure index", path))?;
    let cache_kib = (config.cache_bytes / 1024).max(64) as i64;
    conn.execute_batch(&format!(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA cache_size = -{cache_kib};"
    ))
    .map_err(sql_err("cannot configure index", path))?;
    migrate(&mut conn, path)?;
    Ok(conn)
}

/// Opens the index at `path` read-only (`SQLITE_OPEN_READ_ONLY` plus
/// `PRAGMA query_only`), checking that its schema is one this build reads.
pub(crate) fn open_ro(path: &Path, busy_timeout: std::time::Duration) -> Result<Connection> {
    if !path.exists() {
        return Err(Error::Other(format!(
            "no index at {}: run `spillway reindex {}` to build it from the segments",
            path.display(),
            path.parent().unwrap_or(Path::new(".")).display()
        )));
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI,
    )
    .map_err(sql_err("cannot open index", path))?;
    conn.busy_timeout(busy_timeout)
        .map_err(sql_err("cannot configure index", path))?;
    conn.execute_batch("PRAGMA query_only = ON;")
        .map_err(sql_err("cannot configure index", path))?;
    let version = user_version(&conn, path)?;
    check_not_newer(version, path)?;
    if version < SCHEMA_VERSION {
        return Err(Error::Other(format!(
            "index {} has schema version {version}, older than this build's {SCHEMA_VERSION}: \
             open it once for writing (the service or `spillway reindex`) to migrate it",
            path.display()
        )));
    }
    Ok(conn)
}

fn user_version(conn: &Connection, path: &Path) -> Result<usize> {
    let v: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(sql_err("cannot read the schema version of", path))?;
    usize::try_from(v).map_err(|_| {
        Error::Other(format!(
            "index {} has an invalid schema version {v}",
            path.display()
        ))
    })
}

fn check_not_newer(version: usize, path: &Path) -> Result<()> {
    if version > SCHEMA_VERSION {
        return Err(Error::Other(format!(
            "index {} has schema version {version}, newer than this build of spillway \
             understands (version {SCHEMA_VERSION}); upgrade spillway, or rebuild the \
             index from the segments with `spillway reindex`",
            path.display()
        )));
    }
    Ok(())
}

fn migrate(conn: &mut Connection, path: &Path) -> Result<()> {
    check_not_newer(user_version(conn, path)?, path)?;
    migrations().to_latest(conn).map_err(|e| match e {
        rusqlite_migration::Error::RusqliteError { err, .. } => Error::Sqlite {
            action: "cannot migrate index",
            path: path.to_path_buf(),
            cause: err,
        },
        other => Error::Other(format!(
            "cannot migrate index {} to schema version {SCHEMA_VERSION}: {other}",
            path.display()
        )),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // Catches a migration that does not parse or leaves the version unrecorded.
    #[test]
    fn migrations_are_valid_and_record_the_version() {
        migrations().validate().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(INDEX_FILE);
        let conn = open_rw(&path, &IndexConfig::default()).unwrap();
        assert_eq!(user_version(&conn, &path).unwrap(), SCHEMA_VERSION);
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
    }

    // Catches an index created world-readable (logs may hold secrets).
    #[cfg(unix)]
    #[test]
    fn index_files_are_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join(INDEX_FILE);
        let conn = open_rw(&path, &IndexConfig::default()).unwrap();
        conn.execute_batch("INSERT INTO segments (path, stream) VALUES ('x', 'logs')")
            .unwrap();
        for p in [path.clone(), dir.path().join("sub").join("index.db-wal")] {
            let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", p.display());
        }
        let mode = fs::metadata(dir.path().join("sub"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o700);
    }

    // Catches a garbage file that is not classified as corrupt (the indexer
    // would then retry forever instead of moving it aside).
    #[test]
    fn garbage_file_is_classified_as_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(INDEX_FILE);
        fs::write(&path, vec![0x5a; 8192]).unwrap();
        let err = open_rw(&path, &IndexConfig::default()).unwrap_err();
        assert!(is_corrupt(&err), "{err}");
        assert!(err.to_string().contains("index.db"), "{err}");
    }
}

-- spillway index, schema version 1.
--
-- The segment files (DIR/segments/<stream>/*.zst) are the source of truth;
-- this database is an index built from them and can always be rebuilt with
-- `spillway reindex DIR`. Every line of every segment is one row of `records`.
--
-- Index keys are kept append-friendly: rows arrive in (roughly) timestamp
-- order, so every index below is keyed by ts_ns after at most one small
-- leading column; new entries land at the end of a handful of b-tree ranges.

-- One row per segment file the indexer has seen.
CREATE TABLE segments (
    id            INTEGER PRIMARY KEY,
    -- Path relative to the data directory: segments/logs/logs-...zst
    path          TEXT    NOT NULL UNIQUE,
    -- logs | events | telemetry
    stream        TEXT    NOT NULL,
    -- Timestamps of the earliest and latest indexed record.
    first_ts_ns   INTEGER,
    last_ts_ns    INTEGER,
    -- File size (compressed bytes) when the indexer last looked at it.
    bytes         INTEGER NOT NULL DEFAULT 0,
    -- Uncompressed bytes of the indexed lines, newlines included.
    raw_bytes     INTEGER NOT NULL DEFAULT 0,
    -- The checkpoint: byte offset just past the last indexed frame. It is
    -- updated in the same transaction as the rows of that frame.
    checkpoint    INTEGER NOT NULL DEFAULT 0,
    -- Records indexed from this file.
    records       INTEGER NOT NULL DEFAULT 0,
    -- Damaged frames skipped (reported by the reader with file and offset).
    damaged       INTEGER NOT NULL DEFAULT 0,
    -- Range of records.id holding this file's rows (for cheap deletes when
    -- retention removes the file).
    min_record_id INTEGER,
    max_record_id INTEGER
);

-- One row per batch (a batch's lines are consecutive in one segment).
CREATE TABLE batches (
    id          INTEGER PRIMARY KEY,
    segment_id  INTEGER NOT NULL REFERENCES segments (id),
    -- The engine's batch number (unique within one process run).
    batch       INTEGER NOT NULL,
    prefix      TEXT    NOT NULL,
    kind        TEXT    NOT NULL,
    first_ts_ns INTEGER NOT NULL,
    last_ts_ns  INTEGER NOT NULL,
    -- Records of the batch (drop notices and summary lines not counted).
    records     INTEGER NOT NULL DEFAULT 0,
    -- Records dropped on this prefix before the batch (from its drop notice).
    dropped     INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX batches_by_segment ON batches (segment_id, batch, prefix);

-- One row per segment line: logs, events, samples, drop notices, summaries.
CREATE TABLE records (
    id           INTEGER PRIMARY KEY,
    ts_ns        INTEGER NOT NULL,
    -- log | event | sample | summary
    kind         TEXT    NOT NULL,
    -- Severity for range queries: 1 TRACE, 2 DEBUG, 3 INFO, 4 WARN, 5 ERROR;
    -- NULL for everything that is not a log.
    level        INTEGER,
    level_name   TEXT GENERATED ALWAYS AS (
        CASE level WHEN 1 THEN 'TRACE' WHEN 2 THEN 'DEBUG' WHEN 3 THEN 'INFO'
                   WHEN 4 THEN 'WARN' WHEN 5 THEN 'ERROR' END) VIRTUAL,
    -- The batching key: data:users, log:myapp::db
    prefix       TEXT    NOT NULL,
    -- The event name (data:users:created) or the log target (myapp::db).
    name         TEXT    NOT NULL,
    message      TEXT,
    module       TEXT,
    file         TEXT,
    line         INTEGER,
    -- JSON text, usable with json_extract(fields, '$.user_id').
    fields       TEXT,
    spans        TEXT,
    payload      TEXT,
    batch_id     INTEGER NOT NULL REFERENCES batches (id),
    segment_id   INTEGER NOT NULL REFERENCES segments (id),
    -- Compressed byte offset of the frame the line came from.
    frame_offset INTEGER NOT NULL
);
CREATE INDEX records_by_ts ON records (ts_ns);
CREATE INDEX records_by_level_ts ON records (level, ts_ns) WHERE level IS NOT NULL;

-- Logs, readable as in `spillway tail`.
CREATE VIEW logs AS
SELECT r.id,
       strftime('%Y-%m-%dT%H:%M:%S', r.ts_ns / 1000000000, 'unixepoch')
           || printf('.%09dZ', r.ts_ns % 1000000000) AS ts,
       r.ts_ns, r.level_name AS level, r.level AS level_num, r.prefix,
       r.name AS target, r.module, r.file, r.line, r.message, r.fields, r.spans,
       b.batch, r.segment_id, r.frame_offset
FROM records r LEFT JOIN batches b ON b.id = r.batch_id
WHERE r.kind = 'log';

-- Bus events, telemetry samples and batch summaries.
CREATE VIEW events AS
SELECT r.id,
       strftime('%Y-%m-%dT%H:%M:%S', r.ts_ns / 1000000000, 'unixepoch')
           || printf('.%09dZ', r.ts_ns % 1000000000) AS ts,
       r.ts_ns, r.kind, r.prefix, r.name, r.payload,
       b.batch, r.segment_id, r.frame_offset
FROM records r LEFT JOIN batches b ON b.id = r.batch_id
WHERE r.kind <> 'log';

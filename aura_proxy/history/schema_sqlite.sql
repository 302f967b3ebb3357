-- aura-proxy API call history: SQLite schema.
--
-- {table} is replaced by the configured table name (validated by the config
-- loader as a plain identifier).  Each "-- migration N: ..." line starts a
-- migration.  Migrations run in order, each once, in its own transaction, and
-- are recorded in {table}_schema_version.  NEVER edit an applied migration:
-- append a new one (e.g. "ALTER TABLE {table} ADD COLUMN ...").
--
-- created_at is ISO-8601 UTC text ("2026-01-31T12:00:00.123456+00:00"), which
-- sorts chronologically and is understood by SQLite's date functions.

-- migration 1: call history table and its indexes
CREATE TABLE IF NOT EXISTS {table} (
    id                  TEXT PRIMARY KEY NOT NULL,
    created_at          TEXT NOT NULL,
    tenant_id           TEXT,
    user_id             TEXT,
    agent_id            TEXT,
    source              TEXT,
    caller_type         TEXT,
    method              TEXT NOT NULL,
    path                TEXT NOT NULL,
    route               TEXT,
    query_string        TEXT,
    status_code         INTEGER NOT NULL,
    latency_ms          REAL NOT NULL,
    request_size_bytes  INTEGER,
    response_size_bytes INTEGER,
    client_ip           TEXT,
    user_agent          TEXT,
    trace_id            TEXT,
    is_stream           INTEGER NOT NULL CHECK (is_stream IN (0, 1)),
    first_event_ms      REAL,
    event_count         INTEGER,
    end_reason          TEXT
);
CREATE INDEX IF NOT EXISTS {table}_created_at_idx ON {table} (created_at);
CREATE INDEX IF NOT EXISTS {table}_tenant_created_idx ON {table} (tenant_id, created_at);
CREATE INDEX IF NOT EXISTS {table}_path_created_idx ON {table} (path, created_at);
CREATE INDEX IF NOT EXISTS {table}_status_created_idx ON {table} (status_code, created_at);
CREATE INDEX IF NOT EXISTS {table}_trace_idx ON {table} (trace_id);

-- migration 2: the trace index holds traced calls only
-- Most calls carry no trace id; leaving them out of the index saves a B-tree
-- insert per row, and a lookup by trace id (trace_id = '...') still uses it.
DROP INDEX IF EXISTS {table}_trace_idx;
CREATE INDEX IF NOT EXISTS {table}_trace_idx ON {table} (trace_id) WHERE trace_id IS NOT NULL;

-- migration 3: what a stream's client got, and which stream it was
-- event_count, response_size_bytes and latency_ms of a stream now say what its
-- client got; a detached stream's tail (read into the stream log after the
-- client left) is its own figure; stream_id links a resumed connection's row
-- to the stream it continues.  (The gateway adds a column only if it is
-- missing: a table created by hand with these columns is left as it is.)
ALTER TABLE {table} ADD COLUMN stream_id TEXT;
ALTER TABLE {table} ADD COLUMN resumed_after INTEGER;
ALTER TABLE {table} ADD COLUMN detached_event_count INTEGER;
ALTER TABLE {table} ADD COLUMN detached_ms REAL;
CREATE INDEX IF NOT EXISTS {table}_stream_idx ON {table} (stream_id) WHERE stream_id IS NOT NULL;

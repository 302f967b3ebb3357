-- aura-proxy API call history: PostgreSQL schema.
--
-- {table} is replaced by the configured table name (validated by the config
-- loader as a plain identifier).  Each "-- migration N: ..." line starts a
-- migration.  Migrations run in order, each once, in its own transaction, and
-- are recorded in {table}_schema_version.  NEVER edit an applied migration:
-- append a new one (e.g. "ALTER TABLE {table} ADD COLUMN IF NOT EXISTS ...").

-- migration 1: call history table and its indexes
CREATE TABLE IF NOT EXISTS {table} (
    id                  text PRIMARY KEY,
    created_at          timestamptz NOT NULL,
    tenant_id           text,
    user_id             text,
    agent_id            text,
    source              text,
    caller_type         text,
    method              text NOT NULL,
    path                text NOT NULL,
    route               text,
    query_string        text,
    status_code         integer NOT NULL,
    latency_ms          double precision NOT NULL,
    request_size_bytes  bigint,
    response_size_bytes bigint,
    client_ip           text,
    user_agent          text,
    trace_id            text,
    is_stream           boolean NOT NULL,
    first_event_ms      double precision,
    event_count         bigint,
    end_reason          text
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
-- to the stream it continues.  Adding a NULL column does not rewrite the
-- table; the index is built like migration 2's (see docs/history.md).
ALTER TABLE {table} ADD COLUMN IF NOT EXISTS stream_id text;
ALTER TABLE {table} ADD COLUMN IF NOT EXISTS resumed_after bigint;
ALTER TABLE {table} ADD COLUMN IF NOT EXISTS detached_event_count bigint;
ALTER TABLE {table} ADD COLUMN IF NOT EXISTS detached_ms double precision;
CREATE INDEX IF NOT EXISTS {table}_stream_idx ON {table} (stream_id) WHERE stream_id IS NOT NULL;

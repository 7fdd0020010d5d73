-- The event log and its projection.
--
-- Instants are INTEGER microseconds since the Unix epoch (UTC), so comparisons
-- and ORDER BY are exact. JSON values (payload, error_reason, changes) are text.
-- The store applies this file in one transaction and records it in
-- kharon_schema; statements are split with sqlite3.complete_statement.

-- The append-only log. seq is the global order of all events; AUTOINCREMENT
-- keeps seq values of removed rows from ever being reused, so a reader that
-- pages through the log with seq > n never sees an old number again.
CREATE TABLE events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    ticket_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    kind TEXT NOT NULL,
    at INTEGER NOT NULL,
    actor TEXT,
    status_before TEXT,
    status_after TEXT,
    changes TEXT NOT NULL,
    schema_version INTEGER NOT NULL,
    -- A second event with the same version means two writers decided on the
    -- same state; the store maps this to kharon.VersionConflict.
    UNIQUE (ticket_id, version)
);

-- The projection: one row per ticket that currently exists, the fold of its
-- events. put_seq is the seq of the put event that started the current
-- lifecycle, the tie-breaker of the poll order.
CREATE TABLE tickets (
    id TEXT PRIMARY KEY NOT NULL,
    type TEXT NOT NULL,
    payload TEXT NOT NULL,
    nice INTEGER NOT NULL,
    runat INTEGER,
    status TEXT NOT NULL
        CHECK (status IN ('pending', 'running', 'done', 'failed', 'cancelled')),
    attempts INTEGER NOT NULL,
    error_reason TEXT NOT NULL,
    created_at INTEGER,
    updated_at INTEGER,
    expires_at INTEGER,
    version INTEGER NOT NULL,
    lease_version INTEGER,
    put_seq INTEGER NOT NULL
);

-- The poll: WHERE status IN ('pending', 'running') AND runat <= ?
-- ORDER BY nice, runat, put_seq LIMIT ?. Read in index order, no sort step.
CREATE INDEX tickets_poll ON tickets (nice, runat, put_seq)
    WHERE status IN ('pending', 'running');

-- next_due_at: min(runat) of pending and running tickets, one index probe.
CREATE INDEX tickets_next_due ON tickets (runat)
    WHERE status IN ('pending', 'running');

-- Expiration: finished tickets in expires_at order.
CREATE INDEX tickets_expiry ON tickets (expires_at, id)
    WHERE status IN ('done', 'failed', 'cancelled');

-- Listing by status or by type, in id order.
CREATE INDEX tickets_status_id ON tickets (status, id);
CREATE INDEX tickets_type_id ON tickets (type, id);

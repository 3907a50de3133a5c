-- Orderly's store schema for one service. Runs with search_path set to the
-- service's own schema, so every name here is created inside it.
-- Never edit a released migration: add a new file with the next number.

-- Documents: service-local tables of JSON documents. Keys and index values
-- use the "C" collation so scans page in byte order, as on SQLite, whatever
-- the server's default locale. `version` counts puts (optimistic concurrency).
CREATE TABLE docs (
    tbl     TEXT COLLATE "C" NOT NULL,
    key     TEXT COLLATE "C" NOT NULL,
    idx     TEXT COLLATE "C",
    doc     BYTEA NOT NULL,
    version BIGINT NOT NULL DEFAULT 1 CHECK (version > 0),
    PRIMARY KEY (tbl, key)
);
CREATE INDEX docs_by_idx ON docs (tbl, idx, key);

-- The transactional outbox. Positions are assigned by the store from
-- outbox_head under that row's lock, so they are dense (1, 2, 3, ...) and
-- become visible in commit order.
CREATE TABLE outbox (
    position BIGINT PRIMARY KEY CHECK (position > 0),
    id       TEXT NOT NULL,
    subject  TEXT NOT NULL,
    event    BYTEA NOT NULL,
    CONSTRAINT outbox_id_unique UNIQUE (id)
);
CREATE INDEX outbox_by_subject ON outbox (subject, position);

-- The last assigned outbox position: exactly one row. Every commit that
-- appends events updates it, which serializes outbox appends per schema.
CREATE TABLE outbox_head (
    singleton BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (singleton),
    position  BIGINT NOT NULL CHECK (position >= 0)
);
INSERT INTO outbox_head (singleton, position) VALUES (TRUE, 0);

-- How far this service has consumed each producer's outbox.
CREATE TABLE cursors (
    producer   TEXT PRIMARY KEY,
    position   BIGINT NOT NULL CHECK (position >= 0),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Event ids this service has processed (distributed mode). created_at lets
-- old entries be pruned once redelivery of them is no longer possible.
CREATE TABLE inbox (
    id         TEXT PRIMARY KEY,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX inbox_by_created_at ON inbox (created_at);

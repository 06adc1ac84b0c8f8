-- pgreact schema, version 1.
-- __SCHEMA__ is replaced by the quoted schema name, __CHANNEL__ by the wake-up channel literal.
-- One row of `queue` is one captured change for one handler ("a delivery"): fan-out happens at
-- capture time, so each handler's progress, retries and dead letters are independent.

CREATE SEQUENCE __SCHEMA__.change_id_seq CACHE 32;

CREATE TABLE __SCHEMA__.subscriptions (
    handler      text PRIMARY KEY,
    table_schema text NOT NULL,
    table_name   text NOT NULL,
    ops          text[] NOT NULL,
    ordered      boolean NOT NULL DEFAULT true,
    key_columns  text[],              -- NULL: order by the primary key (the trigger's arguments)
    updated_at   timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX subscriptions_table ON __SCHEMA__.subscriptions (table_schema, table_name);

-- id: capture order. No sequence cache here: a per-key order must follow commit order, and a
-- cached block would let a later change of a row take a lower id than an earlier one.
CREATE TABLE __SCHEMA__.queue (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    change_id   bigint NOT NULL,
    handler     text NOT NULL,
    table_name  text NOT NULL,
    op          text NOT NULL,
    row_key     text,
    order_key   text,
    new_row     jsonb,
    old_row     jsonb,
    created_at  timestamptz NOT NULL DEFAULT statement_timestamp(),
    run_at      timestamptz NOT NULL DEFAULT '-infinity',
    attempts    integer NOT NULL DEFAULT 0,
    owner       integer,
    claim_token bigint,
    lease_until timestamptz,
    last_error  text,
    failed_at   timestamptz,
    dead_at     timestamptz
) WITH (fillfactor = 80);  -- room for HOT updates when a delivery is claimed

-- Claim scan: a handler's live deliveries in capture order.
CREATE INDEX queue_claim ON __SCHEMA__.queue (handler, id) WHERE dead_at IS NULL;
-- Head-of-line check: is an earlier delivery of the same key still live?
CREATE INDEX queue_order ON __SCHEMA__.queue (handler, order_key, id)
    WHERE dead_at IS NULL AND order_key IS NOT NULL;
-- Dead letters only (live inserts never touch this partial index).
CREATE INDEX queue_dead ON __SCHEMA__.queue (handler, id) WHERE dead_at IS NOT NULL;

-- The doorbell. NOTIFY takes a database-wide lock at commit, so a NOTIFY in every writer's
-- transaction serialises their commits (and their WAL flushes). Instead, the first writer after
-- the consumers went idle finds the bell armed, disarms it and rings once; later writers only
-- read it. A consumer that runs out of work re-arms the bell and sweeps once more, so an event
-- committed in between is not left waiting (the periodic sweep is the backstop).
CREATE TABLE __SCHEMA__.doorbell (
    id    integer PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    armed boolean NOT NULL DEFAULT true
);
INSERT INTO __SCHEMA__.doorbell DEFAULT VALUES;

CREATE FUNCTION __SCHEMA__.ring() RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF (SELECT armed FROM __SCHEMA__.doorbell) THEN
        -- Concurrent writers that also saw it armed wait here for our commit, then find it
        -- disarmed: one NOTIFY per idle-to-busy transition, whatever the write rate.
        UPDATE __SCHEMA__.doorbell SET armed = false WHERE armed;
        IF FOUND THEN
            PERFORM pg_notify(__CHANNEL__, '');
        END IF;
    END IF;
END
$$;

-- The text key of a row image: one column's text, or a JSON array for several columns.
-- (Trigger arguments arrive as TG_ARGV, an array whose lower bound is 0, hence array_lower.)
CREATE FUNCTION __SCHEMA__.key_of(img jsonb, cols text[]) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN cols IS NULL OR cardinality(cols) = 0 OR img IS NULL THEN NULL
        WHEN cardinality(cols) = 1 THEN img ->> cols[array_lower(cols, 1)]
        ELSE (SELECT jsonb_agg(img -> c ORDER BY o)::text FROM unnest(cols) WITH ORDINALITY u(c, o))
    END
$$;

-- Statement-level capture of INSERT and DELETE through transition tables: one INSERT … SELECT
-- per statement whatever its row count, and one wake-up. TG_ARGV holds the primary key columns.
CREATE FUNCTION __SCHEMA__.capture_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
BEGIN
    -- MATERIALIZED: one change id per row, computed before the fan-out join (a flattened
    -- subquery would call nextval() once per row *and handler*).
    WITH c AS MATERIALIZED (
        SELECT nextval('__SCHEMA__.change_id_seq') AS change_id, i.img,
               __SCHEMA__.key_of(i.img, TG_ARGV) AS row_key
        FROM (SELECT to_jsonb(r) AS img FROM pgreact_new_rows r) i
    )
    INSERT INTO __SCHEMA__.queue (change_id, handler, table_name, op, row_key, order_key, new_row)
    SELECT c.change_id, s.handler, TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, 'INSERT', c.row_key,
           CASE WHEN s.ordered THEN __SCHEMA__.key_of(c.img, coalesce(s.key_columns, TG_ARGV)) END,
           c.img
    FROM c
    JOIN __SCHEMA__.subscriptions s
      ON s.table_schema = TG_TABLE_SCHEMA AND s.table_name = TG_TABLE_NAME
     AND 'INSERT' = ANY (s.ops)
    ORDER BY c.change_id, s.handler;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 THEN
        PERFORM __SCHEMA__.ring();
    END IF;
    RETURN NULL;
END
$$;

CREATE FUNCTION __SCHEMA__.capture_delete() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
BEGIN
    WITH c AS MATERIALIZED (
        SELECT nextval('__SCHEMA__.change_id_seq') AS change_id, i.img,
               __SCHEMA__.key_of(i.img, TG_ARGV) AS row_key
        FROM (SELECT to_jsonb(r) AS img FROM pgreact_old_rows r) i
    )
    INSERT INTO __SCHEMA__.queue (change_id, handler, table_name, op, row_key, order_key, old_row)
    SELECT c.change_id, s.handler, TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, 'DELETE', c.row_key,
           CASE WHEN s.ordered THEN __SCHEMA__.key_of(c.img, coalesce(s.key_columns, TG_ARGV)) END,
           c.img
    FROM c
    JOIN __SCHEMA__.subscriptions s
      ON s.table_schema = TG_TABLE_SCHEMA AND s.table_name = TG_TABLE_NAME
     AND 'DELETE' = ANY (s.ops)
    ORDER BY c.change_id, s.handler;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 THEN
        PERFORM __SCHEMA__.ring();
    END IF;
    RETURN NULL;
END
$$;

-- UPDATE is captured per row: transition tables do not say which old row became which new one
-- (a primary key may change), and a wrong pairing would be silent data corruption.
CREATE FUNCTION __SCHEMA__.capture_update() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    new_img jsonb := to_jsonb(NEW);
    old_img jsonb := to_jsonb(OLD);
    cid bigint := nextval('__SCHEMA__.change_id_seq');
    n bigint;
BEGIN
    INSERT INTO __SCHEMA__.queue
        (change_id, handler, table_name, op, row_key, order_key, new_row, old_row)
    SELECT cid, s.handler, TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, 'UPDATE',
           __SCHEMA__.key_of(new_img, TG_ARGV),
           CASE WHEN s.ordered THEN __SCHEMA__.key_of(new_img, coalesce(s.key_columns, TG_ARGV)) END,
           new_img, old_img
    FROM __SCHEMA__.subscriptions s
    WHERE s.table_schema = TG_TABLE_SCHEMA AND s.table_name = TG_TABLE_NAME
      AND 'UPDATE' = ANY (s.ops)
    ORDER BY s.handler;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 THEN
        PERFORM __SCHEMA__.ring();
    END IF;
    RETURN NULL;
END
$$;

-- pgreact schema, version 4: capture that follows its table, sees partitions and TRUNCATE,
-- orders key-changing updates under both keys, and runs as the schema's owner only.

-- Subscriptions follow the table itself, not its name: a renamed table keeps its oid (and its
-- triggers), so its changes are still captured, reported under the name the handler was
-- installed with. The daemon and `check` say loudly that the name changed (capture_state).
ALTER TABLE __SCHEMA__.subscriptions ADD COLUMN table_oid oid;
UPDATE __SCHEMA__.subscriptions
    SET table_oid = to_regclass(quote_ident(table_schema) || '.' || quote_ident(table_name));
CREATE INDEX subscriptions_table_oid ON __SCHEMA__.subscriptions (table_oid);

-- A fence: an UPDATE that changes a row's order key is delivered under its old key (after
-- the old key's earlier events, before its later ones) and writes this never-claimed row
-- (op 'FENCE', run_at 'infinity') under its new key, so the new key's later events wait for it
-- too. A fence's row_key is the old key, which finds its delivery through queue_order; its
-- last_error is set, which keeps fences in the small queue_suspect index where
-- release_fences() looks for them. The daemon removes a fence once its delivery is gone
-- (handled) or dead.

-- The doorbell never makes a writer wait. Version 1 disarmed it with a plain UPDATE: while the
-- transaction that disarmed it was open (an import, a forgotten `idle in transaction`), every
-- other writer that still saw the bell armed queued on its row lock until that transaction
-- ended. Now a writer that finds the row locked skips it and rings itself: NOTIFY per commit
-- costs a little (commits take the notify lock), but only while a ringer is in flight.
DROP FUNCTION __SCHEMA__.ring();
-- The wake-up names the (installed name of the) table, so the daemon wakes only its handlers;
-- any other handler's change committed while the bell is down is found when it is re-armed.
-- A REPEATABLE READ or SERIALIZABLE writer never touches the bell: its snapshot may still see
-- it armed after another writer disarmed it, and locking that row would fail the writer's
-- transaction ("could not serialize access due to concurrent update"); under SERIALIZABLE,
-- reading it would also take a predicate lock every ringer conflicts with. Such a writer just
-- rings, at the price of a NOTIFY per commit.
-- Each ring is signed (service/doorbell.py): any role may NOTIFY this channel, and the daemon
-- holds such hints back after a claim that found nothing, but never a ring of the doorbell's.
CREATE SEQUENCE __SCHEMA__.ring_seq;
CREATE FUNCTION __SCHEMA__.ring(rels oid[]) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    signed text;
BEGIN
    IF current_setting('transaction_isolation') = 'read committed' THEN
        IF NOT (SELECT armed FROM __SCHEMA__.doorbell) THEN
            RETURN;
        END IF;
        UPDATE __SCHEMA__.doorbell SET armed = false
        WHERE id = (SELECT id FROM __SCHEMA__.doorbell WHERE armed FOR UPDATE SKIP LOCKED);
        -- Disarmed here, or held by a writer that rings only when (and if) it commits: ring.
    END IF;
    signed := 'ring/' || nextval('__SCHEMA__.ring_seq');
    PERFORM pg_notify(__CHANNEL__, signed || '/' || __SCHEMA__.mark_mac(signed) || '/' || coalesce((
        SELECT min(s.table_schema || '.' || s.table_name)
        FROM __SCHEMA__.subscriptions s WHERE s.table_oid = ANY (rels)), ''));
END
$$;

-- Row images use `rows.*`, never a bare alias: a column named like the alias (`r`) would be
-- taken for it, and the image would be that column's value.
CREATE OR REPLACE FUNCTION __SCHEMA__.capture_insert() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n bigint;
BEGIN
    WITH c AS MATERIALIZED (
        SELECT nextval('__SCHEMA__.change_id_seq') AS change_id, i.img,
               __SCHEMA__.key_of(i.img, TG_ARGV) AS row_key
        FROM (SELECT to_jsonb(pgreact_new_rows.*) AS img FROM pgreact_new_rows) i
    )
    INSERT INTO __SCHEMA__.queue (change_id, handler, table_name, op, row_key, order_key, new_row)
    SELECT c.change_id, s.handler, s.table_schema || '.' || s.table_name, 'INSERT', c.row_key,
           CASE WHEN s.ordered THEN __SCHEMA__.key_of(c.img, coalesce(s.key_columns, TG_ARGV)) END,
           c.img
    FROM c
    JOIN __SCHEMA__.subscriptions s ON s.table_oid = TG_RELID AND 'INSERT' = ANY (s.ops)
    ORDER BY c.change_id, s.handler;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 THEN
        PERFORM __SCHEMA__.ring(ARRAY[TG_RELID]);
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION __SCHEMA__.capture_delete() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n bigint;
BEGIN
    WITH c AS MATERIALIZED (
        SELECT nextval('__SCHEMA__.change_id_seq') AS change_id, i.img,
               __SCHEMA__.key_of(i.img, TG_ARGV) AS row_key
        FROM (SELECT to_jsonb(pgreact_old_rows.*) AS img FROM pgreact_old_rows) i
    )
    INSERT INTO __SCHEMA__.queue (change_id, handler, table_name, op, row_key, order_key, old_row)
    SELECT c.change_id, s.handler, s.table_schema || '.' || s.table_name, 'DELETE', c.row_key,
           CASE WHEN s.ordered THEN __SCHEMA__.key_of(c.img, coalesce(s.key_columns, TG_ARGV)) END,
           c.img
    FROM c
    JOIN __SCHEMA__.subscriptions s ON s.table_oid = TG_RELID AND 'DELETE' = ANY (s.ops)
    ORDER BY c.change_id, s.handler;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 THEN
        PERFORM __SCHEMA__.ring(ARRAY[TG_RELID]);
    END IF;
    RETURN NULL;
END
$$;

-- One row change, for every handler subscribed to one of `rels` (the table, or a partition and
-- its ancestors), with a fence where an UPDATE changed the handler's order key. One statement.
-- Only ever called by the capture functions, as the schema's owner.
CREATE FUNCTION __SCHEMA__.enqueue_row(
    rels oid[], change_op text, new_img jsonb, old_img jsonb, pk text[]
) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    cid bigint := nextval('__SCHEMA__.change_id_seq');
    -- The primary key's text after and before (the order key of handlers without key=).
    new_pk text := __SCHEMA__.key_of(coalesce(new_img, old_img), pk);
    old_pk text := CASE WHEN old_img IS NULL THEN new_pk ELSE __SCHEMA__.key_of(old_img, pk) END;
    n bigint;
BEGIN
    INSERT INTO __SCHEMA__.queue (change_id, handler, table_name, op, row_key, order_key,
                                  new_row, old_row, run_at, last_error)
    SELECT cid, s.handler, s.table_schema || '.' || s.table_name,
           v.op, v.row_key, v.order_key, v.new_row, v.old_row, v.run_at, v.last_error
    FROM __SCHEMA__.subscriptions s
    CROSS JOIN LATERAL (
        SELECT CASE WHEN NOT s.ordered THEN NULL
                    WHEN s.key_columns IS NULL THEN old_pk
                    ELSE __SCHEMA__.key_of(coalesce(old_img, new_img), s.key_columns) END
                   AS old_key,
               CASE WHEN NOT s.ordered OR change_op <> 'UPDATE' THEN NULL
                    WHEN s.key_columns IS NULL THEN new_pk
                    ELSE __SCHEMA__.key_of(new_img, s.key_columns) END AS new_key
    ) k
    CROSS JOIN LATERAL (VALUES
        (change_op, new_pk, k.old_key, new_img, old_img, '-infinity'::timestamptz, NULL::text),
        ('FENCE', k.old_key, k.new_key, NULL, NULL, 'infinity',
         'fence: holds the later events of this key until the UPDATE that gave a row this key '
         || '(change ' || cid || ') is handled')
    ) v (op, row_key, order_key, new_row, old_row, run_at, last_error)
    WHERE s.table_oid = ANY (rels) AND change_op = ANY (s.ops)
      AND (v.op <> 'FENCE' OR k.new_key <> k.old_key)
    ORDER BY s.handler, v.op = 'FENCE';
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 THEN
        PERFORM __SCHEMA__.ring(rels);
    END IF;
END
$$;

-- UPDATE of a plain table, per row (transition tables do not pair old and new rows).
CREATE OR REPLACE FUNCTION __SCHEMA__.capture_update() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM __SCHEMA__.enqueue_row(
        ARRAY[TG_RELID], 'UPDATE', to_jsonb(NEW), to_jsonb(OLD), TG_ARGV);
    RETURN NULL;
END
$$;

-- Every row change of a partitioned table. A row trigger on the partitioned table is cloned
-- onto each partition, present and attached later, and fires for changes made through the
-- partition itself too: each is reported as the watched table it belongs to. An UPDATE that
-- moves a row to another partition is, to triggers, a DELETE from one and an INSERT into the
-- other, and is reported so.
CREATE FUNCTION __SCHEMA__.capture_row() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM __SCHEMA__.enqueue_row(
        ARRAY(SELECT relid::oid FROM pg_partition_ancestors(TG_RELID)), TG_OP,
        to_jsonb(NEW), to_jsonb(OLD), TG_ARGV);
    RETURN NULL;
END
$$;

-- TRUNCATE, once per statement and table: an event for handlers subscribed to it (key NULL,
-- or the partition's name when only a partition was emptied), a WARNING to the truncating
-- session naming the handlers that are not.
--
-- TRUNCATE of a partitioned table fires this on it and then on every partition below it; the
-- handlers of the partitioned table (and of its ancestors) must get one event, not one per
-- partition. So a call on a partitioned table leaves a mark, in a transaction-local setting,
-- and the calls on its partitions later in the same statement deliver only to the tables
-- between them and it. Anyone can write that setting, and a mark taken for genuine would
-- silence an event: a mark counts only when it names this transaction and this statement
-- (statement_timestamp()), when no change was captured since it was left (the session's last
-- change id, which every capture draws, is still the one it names), and when it carries a
-- MAC under a key only the owner can read (mark_key), so a writer can neither make one up nor
-- carry one over from an earlier statement. A mark that does not count is ignored: at worst a
-- handler gets one TRUNCATE event too many, never one too few. The WARNING is raised by every
-- call, de-duplicated or not.
CREATE TABLE __SCHEMA__.mark_key (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    secret text NOT NULL
);
INSERT INTO __SCHEMA__.mark_key (secret)
    VALUES (gen_random_uuid()::text || gen_random_uuid()::text);

-- sha256(key || sha256(key || body)): the outer hash keeps a length extension from forging.
CREATE FUNCTION __SCHEMA__.mark_mac(body text) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT encode(sha256(convert_to(m.secret || encode(sha256(convert_to(
               m.secret || body, 'UTF8')), 'hex'), 'UTF8')), 'hex')
    FROM __SCHEMA__.mark_key m
$$;

CREATE FUNCTION __SCHEMA__.capture_truncate() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    -- The truncated table and its ancestors, nearest first (pg_partition_ancestors lists
    -- nothing for a table that is not a partition).
    up oid[] := ARRAY[TG_RELID] || ARRAY(
        SELECT relid::oid FROM pg_partition_ancestors(TG_RELID) WHERE relid <> TG_RELID);
    partitioned boolean := EXISTS (
        SELECT 1 FROM pg_class WHERE oid = TG_RELID AND relkind = 'p');
    setting text := 'pgreact.truncated_' || '__SCHEMA__'::regnamespace::oid::text;
    here text := pg_current_xact_id()::text || '/'
        || extract(epoch FROM statement_timestamp())::text;
    mark text[] := string_to_array(current_setting(setting, true), '/');
    -- Partitioned tables truncated earlier in this statement, whose calls delivered already.
    done oid[] := '{}';
    reach int := cardinality(up);  -- this call delivers for up[1:reach]
    cid bigint;
    n bigint := 0;
    body text;
    deaf text;
BEGIN
    IF cardinality(mark) = 5 AND mark[1] || '/' || mark[2] = here
       AND mark[5] = __SCHEMA__.mark_mac(array_to_string(mark[1:4], '/'))
    THEN
        -- Genuine, so this session drew a change id since its transaction began.
        IF mark[3] = currval('__SCHEMA__.change_id_seq')::text THEN
            done := string_to_array(mark[4], ',')::oid[];
            reach := coalesce((
                SELECT min(u.i) - 1 FROM unnest(up) WITH ORDINALITY u(rel, i)
                WHERE u.i > 1 AND u.rel = ANY (done)), reach);
        END IF;
    END IF;
    IF reach = cardinality(up) OR EXISTS (
        SELECT 1 FROM __SCHEMA__.subscriptions s
        WHERE s.table_oid = ANY (up[1:reach]) AND 'TRUNCATE' = ANY (s.ops)
    ) THEN
        cid := nextval('__SCHEMA__.change_id_seq');
        INSERT INTO __SCHEMA__.queue (change_id, handler, table_name, op, row_key)
        SELECT cid, s.handler, s.table_schema || '.' || s.table_name, 'TRUNCATE',
               CASE WHEN s.table_oid <> TG_RELID THEN TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME END
        FROM __SCHEMA__.subscriptions s
        WHERE s.table_oid = ANY (up[1:reach]) AND 'TRUNCATE' = ANY (s.ops)
        ORDER BY s.handler;
        GET DIAGNOSTICS n = ROW_COUNT;
    END IF;
    IF partitioned OR (cid IS NOT NULL AND cardinality(done) > 0) THEN
        body := here || '/' || coalesce(cid::text, mark[3]) || '/'
            || array_to_string(done || CASE WHEN partitioned THEN TG_RELID END, ',');
        PERFORM set_config(setting, body || '/' || __SCHEMA__.mark_mac(body), true);
    END IF;
    SELECT string_agg(s.handler, ', ' ORDER BY s.handler) INTO deaf
    FROM __SCHEMA__.subscriptions s
    WHERE s.table_oid = ANY (up) AND NOT 'TRUNCATE' = ANY (s.ops);
    IF deaf IS NOT NULL THEN
        -- (no format placeholders: install runs this text through drivers that read them)
        RAISE WARNING USING
            MESSAGE = 'pgreact: TRUNCATE of ' || TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME
                || ' is not delivered to handler(s) ' || deaf
                || ' (their ops do not include TRUNCATE)',
            HINT = 'What they derived from this table may now be stale: rebuild it, or '
                'subscribe them with ops=(..., "TRUNCATE").';
    END IF;
    IF n > 0 THEN
        PERFORM __SCHEMA__.ring(up[1:reach]);
    END IF;
    RETURN NULL;
END
$$;

-- Casts to json that capture would run as the schema's owner. to_jsonb() turns a value of a
-- type that has a cast to json into JSON through that cast's function, and capture runs
-- SECURITY DEFINER: whoever owns such a function, and a type that a watched table uses
-- (directly, as an array's element, a domain's base or a composite's field), could run SQL as
-- the owner (forge events, read the queue). Casts whose function the owner or a superuser owns
-- are trusted. Per column of `rel`: the column, the type with the cast, the cast's target, its
-- function and that function's owner.
CREATE FUNCTION __SCHEMA__.unsafe_casts(rel oid)
RETURNS TABLE (column_name text, type_name text, target text, function_name text, owner text)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    WITH RECURSIVE reach (attnum, attname, typ) AS (
        SELECT a.attnum, a.attname::text, a.atttypid
        FROM pg_attribute a WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped
        UNION
        SELECT r.attnum, r.attname, x.inner_type
        FROM reach r
        JOIN pg_type t ON t.oid = r.typ
        CROSS JOIN LATERAL (
            SELECT t.typbasetype WHERE t.typtype = 'd'
            UNION ALL
            SELECT t.typelem WHERE t.typelem <> 0
            UNION ALL
            SELECT f.atttypid FROM pg_attribute f
            WHERE t.typrelid <> 0 AND f.attrelid = t.typrelid AND f.attnum > 0
              AND NOT f.attisdropped
        ) x (inner_type)
    )
    SELECT DISTINCT r.attname, k.castsource::regtype::text, k.casttarget::regtype::text,
           k.castfunc::regprocedure::text, o.rolname::text
    FROM reach r
    JOIN pg_cast k ON k.castsource = r.typ AND k.castmethod = 'f'
                  AND k.casttarget IN ('json'::regtype, 'jsonb'::regtype)
    JOIN pg_proc f ON f.oid = k.castfunc
    JOIN pg_roles o ON o.oid = f.proowner
    WHERE NOT o.rolsuper
      AND f.proowner <> (SELECT nspowner FROM pg_namespace
                         WHERE oid = '__SCHEMA__'::regnamespace)
    ORDER BY 1, 2, 3
$$;

-- Is every subscription still captured, and safely? Per subscription: the name it was
-- installed with, the table's name now (NULL: dropped), what is missing (ops whose trigger is
-- absent, disabled or of the wrong kind; '<op> on <partition>' for a partition whose TRUNCATE
-- trigger is missing or whose cloned row trigger is disabled), and the casts to json capture
-- would run as the schema's owner (unsafe_casts).
CREATE FUNCTION __SCHEMA__.capture_state()
RETURNS TABLE (
    handler text, installed_as text, current_name text, missing text[], unsafe text[]
)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT s.handler, s.table_schema || '.' || s.table_name, n.nspname || '.' || c.relname,
           CASE WHEN c.oid IS NOT NULL THEN here.missing || ARRAY(
               -- Partitions: a TRUNCATE trigger each; the row triggers are clones of the
               -- table's (reported here only when the table's own is in place).
               SELECT w.o || ' on ' || pn.nspname || '.' || pc.relname
               FROM pg_partition_tree(c.oid) pt
               JOIN pg_class pc ON pc.oid = pt.relid
               JOIN pg_namespace pn ON pn.oid = pc.relnamespace
               CROSS JOIN LATERAL unnest(s.ops || '{TRUNCATE}'::text[]) WITH ORDINALITY w (o, i)
               WHERE pt.relid <> c.oid
                 AND (w.o = 'TRUNCATE' OR c.relkind = 'p' AND NOT w.o = ANY (here.missing))
                 AND NOT EXISTS (
                     SELECT 1 FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
                     WHERE t.tgrelid = pt.relid AND t.tgenabled IN ('O', 'A')
                       AND p.pronamespace = '__SCHEMA__'::regnamespace
                       AND p.proname = CASE WHEN w.o = 'TRUNCATE' THEN 'capture_truncate'
                                            ELSE 'capture_row' END
                       AND t.tgtype & CASE w.o WHEN 'INSERT' THEN 4 WHEN 'DELETE' THEN 8
                                               WHEN 'UPDATE' THEN 16 ELSE 32 END <> 0)
               GROUP BY pn.nspname, pc.relname, w.o
               ORDER BY pn.nspname, pc.relname, min(w.i)
           ) END,
           ARRAY(
               SELECT 'column ' || u.column_name || ' (type ' || u.type_name || ') has a cast to '
                      || u.target || ' through ' || u.function_name || ', owned by '
                      || u.owner
               FROM __SCHEMA__.unsafe_casts(c.oid) u
           )
    FROM __SCHEMA__.subscriptions s
    LEFT JOIN pg_class c ON c.oid = s.table_oid
    LEFT JOIN pg_namespace n ON n.oid = c.relnamespace
    CROSS JOIN LATERAL (
        SELECT ARRAY(
            SELECT o FROM unnest(s.ops || '{TRUNCATE}'::text[]) WITH ORDINALITY u (o, i)
            WHERE NOT EXISTS (
                SELECT 1 FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
                WHERE t.tgrelid = c.oid AND t.tgenabled IN ('O', 'A')
                  AND p.pronamespace = '__SCHEMA__'::regnamespace
                  AND p.proname = CASE WHEN o = 'TRUNCATE' THEN 'capture_truncate'
                                       WHEN c.relkind = 'p' THEN 'capture_row'
                                       ELSE 'capture_' || lower(o) END
                  AND t.tgtype & CASE o WHEN 'INSERT' THEN 4 WHEN 'DELETE' THEN 8
                                        WHEN 'UPDATE' THEN 16 ELSE 32 END <> 0)
            GROUP BY o ORDER BY min(i)
        ) AS missing
    ) here
    ORDER BY s.handler
$$;

-- Remove fences whose delivery was handled (deleted) or dead-lettered: how many went, and how
-- many are left (the daemon looks again soon while some are).
CREATE FUNCTION __SCHEMA__.release_fences(OUT released bigint, OUT remaining bigint)
LANGUAGE sql AS $$
    WITH fences AS (
        SELECT f.id, EXISTS (
                   SELECT 1 FROM __SCHEMA__.queue r
                   WHERE r.handler = f.handler AND r.order_key = f.row_key
                     AND r.change_id = f.change_id AND r.op <> 'FENCE' AND r.dead_at IS NULL
               ) AS holding
        FROM __SCHEMA__.queue f
        WHERE f.dead_at IS NULL AND f.last_error IS NOT NULL AND f.op = 'FENCE'
    ), gone AS (
        DELETE FROM __SCHEMA__.queue q USING fences
        WHERE q.id = fences.id AND NOT fences.holding
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM fences WHERE holding)
$$;

-- Nobody but the owner and the roles it grants to (`pgreact install --print-grants ROLE`)
-- reads or writes pgreact's objects: writers of watched tables need nothing here, capture runs
-- as the owner (SECURITY DEFINER, with a search_path nobody else can put objects into).
REVOKE ALL ON SCHEMA __SCHEMA__ FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA __SCHEMA__ FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA __SCHEMA__ FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA __SCHEMA__ FROM PUBLIC;

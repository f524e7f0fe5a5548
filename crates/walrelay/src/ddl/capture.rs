//! The source side of DDL capture: event triggers that write each schema change into the
//! change stream as a transactional logical message (prefix `walrelay.ddl`), at the place
//! in its transaction where it ran, with what a target needs to replay it: the command,
//! the `search_path` it ran under, the objects it touched and the new shape of every
//! table among them. The same trigger adds a table created under a set's pattern to the
//! publication, in the creating transaction, so that its first row is published.
//!
//! Event triggers need a superuser; without one the relay works in `additive` mode
//! (`ddl::replay::additive`).

use tokio_postgres::Client;

use crate::config::{DdlMode, TablePattern};
use crate::pg::{quote, PgError};

/// The prefix of the messages the trigger writes.
pub const MESSAGE_PREFIX: &str = "walrelay.ddl";

/// A session that sets this (`SET walrelay.own_ddl = on`) is not captured: walrelay's own
/// setup on the source (publication, replica identity) is not for the targets.
pub const OWN_DDL: &str = "SET walrelay.own_ddl = on";

/// The trigger functions. The event trigger functions run as the user who ran the DDL,
/// and only call, by qualified name, the recording functions, which run as their owner
/// (a superuser: `pg_logical_emit_message`, `ALTER PUBLICATION`) with a fixed
/// `search_path`, so that no user's objects can stand in for the catalog's. The caller's
/// `search_path` is read before that, since it is what the command's unqualified names
/// were resolved with.
const INSTALL_SQL: &str = r#"
CREATE SCHEMA IF NOT EXISTS walrelay;
GRANT USAGE ON SCHEMA walrelay TO PUBLIC;
CREATE TABLE IF NOT EXISTS walrelay.ddl_publish (
    publication text NOT NULL,
    schema_name text,
    table_name text
);
REVOKE ALL ON walrelay.ddl_publish FROM PUBLIC;

CREATE OR REPLACE FUNCTION walrelay.ddl_record_drop() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    dropped jsonb;
BEGIN
    IF coalesce(current_setting('walrelay.own_ddl', true), '') = 'on' THEN
        RETURN;
    END IF;
    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'oid', d.objid::int8,
               'type', d.object_type,
               'schema', d.schema_name,
               'name', d.object_name,
               'identity', d.object_identity,
               'original', d.original)), '[]')
      INTO dropped
      FROM pg_event_trigger_dropped_objects() d
     WHERE NOT d.is_temporary
       AND d.schema_name IS DISTINCT FROM 'walrelay';
    PERFORM set_config('walrelay.dropped',
        (coalesce(nullif(current_setting('walrelay.dropped', true), ''), '[]')::jsonb || dropped)::text,
        true);
END
$fn$;

CREATE OR REPLACE FUNCTION walrelay.ddl_record(caller_search_path text, tag text, caller text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    dropped jsonb := coalesce(nullif(current_setting('walrelay.dropped', true), ''), '[]')::jsonb;
    objects jsonb;
    tables jsonb;
    relids oid[];
    t record;
    p record;
BEGIN
    PERFORM set_config('walrelay.dropped', '', true);
    IF coalesce(current_setting('walrelay.own_ddl', true), '') = 'on'
       OR tag LIKE '% PUBLICATION' OR tag LIKE '% SUBSCRIPTION' OR tag LIKE '% EVENT TRIGGER'
       -- A user mapping's options hold a password: never written to the WAL as a message.
       OR tag LIKE '% USER MAPPING' THEN
        RETURN;
    END IF;
    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'type', c.object_type, 'schema', c.schema_name, 'identity', c.object_identity,
               'table', c.relid::int8)), '[]'),
           coalesce(array_agg(c.relid) FILTER (WHERE c.relid IS NOT NULL), '{}')
      INTO objects, relids
      FROM (SELECT d.object_type, d.schema_name, d.object_identity,
                   CASE d.classid
                       WHEN 'pg_class'::regclass THEN
                           (SELECT CASE
                                       WHEN r.relkind IN ('i', 'I') THEN
                                           (SELECT i.indrelid FROM pg_index i WHERE i.indexrelid = r.oid)
                                       WHEN r.relkind = 'S' THEN
                                           (SELECT dp.refobjid FROM pg_depend dp
                                             WHERE dp.classid = 'pg_class'::regclass AND dp.objid = r.oid
                                               AND dp.refclassid = 'pg_class'::regclass
                                               AND dp.deptype IN ('a', 'i')
                                             LIMIT 1)
                                       ELSE r.oid
                                   END
                              FROM pg_class r WHERE r.oid = d.objid)
                       WHEN 'pg_constraint'::regclass THEN
                           (SELECT nullif(k.conrelid, 0) FROM pg_constraint k WHERE k.oid = d.objid)
                       WHEN 'pg_attrdef'::regclass THEN
                           (SELECT a.adrelid FROM pg_attrdef a WHERE a.oid = d.objid)
                       WHEN 'pg_trigger'::regclass THEN
                           (SELECT g.tgrelid FROM pg_trigger g WHERE g.oid = d.objid)
                   END AS relid
              FROM pg_event_trigger_ddl_commands() d
             WHERE NOT d.in_extension
               AND d.schema_name IS DISTINCT FROM 'walrelay'
               AND coalesce(d.schema_name, '') NOT LIKE 'pg\_temp%') c;
    IF objects = '[]'::jsonb AND dropped = '[]'::jsonb THEN
        RETURN;
    END IF;
    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'oid', r.oid::int8,
               'schema', n.nspname,
               'name', r.relname,
               'root', CASE WHEN r.relispartition THEN
                           (SELECT jsonb_build_array(rn.nspname, rc.relname)
                              FROM pg_class rc JOIN pg_namespace rn ON rn.oid = rc.relnamespace
                             WHERE rc.oid = pg_partition_root(r.oid))
                       END,
               'columns', (SELECT coalesce(jsonb_agg(jsonb_build_object(
                                      'name', a.attname,
                                      'type', format_type(a.atttypid, a.atttypmod),
                                      'nullable', NOT a.attnotnull) ORDER BY a.attnum), '[]')
                             FROM pg_attribute a
                            WHERE a.attrelid = r.oid AND a.attnum > 0 AND NOT a.attisdropped),
               'primary_key', (SELECT coalesce(jsonb_agg(a.attname ORDER BY array_position(i.indkey::int2[], a.attnum)), '[]')
                                 FROM pg_index i
                                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
                                WHERE i.indrelid = r.oid AND i.indisprimary))), '[]')
      INTO tables
      FROM pg_class r JOIN pg_namespace n ON n.oid = r.relnamespace
     WHERE r.oid = ANY (relids)
       AND r.relkind IN ('r', 'p');
    -- A table a set's pattern takes joins the publication now, in its creating
    -- transaction, so that its first row is published. Not without a replica identity:
    -- the publication would make the application's updates and deletes of it fail.
    FOR t IN
        SELECT r.oid, n.nspname, r.relname,
               (r.relreplident IN ('f', 'i')
                OR (r.relreplident = 'd'
                    AND EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = r.oid AND i.indisprimary)))
                 AS has_identity
          FROM pg_class r JOIN pg_namespace n ON n.oid = r.relnamespace
         WHERE r.oid = ANY (relids)
           AND r.relkind IN ('r', 'p') AND NOT r.relispartition
           AND EXISTS (SELECT 1 FROM walrelay.ddl_publish w
                        WHERE (w.schema_name IS NULL OR w.schema_name = n.nspname)
                          AND (w.table_name IS NULL OR w.table_name = r.relname))
    LOOP
        IF NOT t.has_identity THEN
            RAISE WARNING 'walrelay: table %.% has no primary key or replica identity, so it is not replicated: give it one, and walrelay takes it at its next start',
                t.nspname, t.relname;
            CONTINUE;
        END IF;
        FOR p IN
            SELECT DISTINCT w.publication
              FROM walrelay.ddl_publish w
              JOIN pg_publication pb ON pb.pubname = w.publication
             WHERE (w.schema_name IS NULL OR w.schema_name = t.nspname)
               AND (w.table_name IS NULL OR w.table_name = t.relname)
               AND NOT pb.puballtables
               AND NOT EXISTS (SELECT 1 FROM pg_publication_rel pr
                                WHERE pr.prpubid = pb.oid AND pr.prrelid = t.oid)
        LOOP
            BEGIN
                EXECUTE format('ALTER PUBLICATION %I ADD TABLE %I.%I', p.publication, t.nspname, t.relname);
            EXCEPTION WHEN OTHERS THEN
                RAISE WARNING 'walrelay: table %.% could not join publication %: %',
                    t.nspname, t.relname, p.publication, SQLERRM;
            END;
        END LOOP;
    END LOOP;
    PERFORM pg_logical_emit_message(true, 'walrelay.ddl', jsonb_build_object(
        'tag', tag,
        'statement', current_query(),
        'search_path', caller_search_path,
        'role', caller,
        'objects', objects,
        'dropped', dropped,
        'tables', tables)::text);
END
$fn$;

CREATE OR REPLACE FUNCTION walrelay.ddl_command_end() RETURNS event_trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM walrelay.ddl_record(pg_catalog.current_setting('search_path'), tg_tag, CURRENT_USER::pg_catalog.text);
END
$fn$;

CREATE OR REPLACE FUNCTION walrelay.ddl_sql_drop() RETURNS event_trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM walrelay.ddl_record_drop();
END
$fn$;

DO $do$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'walrelay_ddl_command_end') THEN
        CREATE EVENT TRIGGER walrelay_ddl_command_end ON ddl_command_end
            EXECUTE FUNCTION walrelay.ddl_command_end();
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'walrelay_ddl_sql_drop') THEN
        CREATE EVENT TRIGGER walrelay_ddl_sql_drop ON sql_drop
            EXECUTE FUNCTION walrelay.ddl_sql_drop();
    END IF;
END
$do$;
"#;

/// The mode in force: `auto` is `statements` for a superuser, `additive` otherwise.
fn effective_mode(configured: DdlMode, is_superuser: bool) -> DdlMode {
    match configured {
        DdlMode::Auto if is_superuser => DdlMode::Statements,
        DdlMode::Auto => DdlMode::Additive,
        other => other,
    }
}

/// The mode in force for a role, or why the configured one cannot be.
pub fn mode_for(configured: DdlMode, is_superuser: bool, role: &str) -> Result<DdlMode, String> {
    let mode = effective_mode(configured, is_superuser);
    if mode == DdlMode::Statements && !is_superuser {
        return Err(format!(
            "[ddl] mode = \"statements\" needs event triggers, which only a superuser may create: make role {role} a superuser, or set mode = \"additive\""
        ));
    }
    Ok(mode)
}

/// What `walrelay check` says of the mode.
pub fn describe(mode: DdlMode, configured: DdlMode) -> String {
    let why = if configured == DdlMode::Auto {
        " (mode = \"auto\")"
    } else {
        ""
    };
    match mode {
        DdlMode::Statements => format!(
            "DDL: statements{why}: an event trigger records each schema change in the stream; postgres targets replay it at its place"
        ),
        DdlMode::Additive => format!(
            "DDL: additive{why}: the source role is not a superuser (event triggers need one), so new columns and wider types are added on postgres targets from the stream; other changes (drops, renames, indexes) must be made on the targets by hand"
        ),
        DdlMode::Off | DdlMode::Auto => {
            "DDL: off: schema changes must be made on the targets by hand, before the source".into()
        }
    }
}

/// Install the triggers (idempotent) and record which new tables join `publication`.
/// Runs in one transaction, so that two relays starting together leave one trigger pair.
pub async fn install(
    client: &Client,
    publication: &str,
    patterns: &[&TablePattern],
) -> Result<(), PgError> {
    let err = |e| PgError::from_sql("installing the DDL capture triggers on the source", e);
    client
        .batch_execute("BEGIN; SELECT pg_advisory_xact_lock(hashtext('walrelay.ddl_install'))")
        .await
        .map_err(err)?;
    let result = async {
        client.batch_execute(INSTALL_SQL).await?;
        client
            .execute(
                "DELETE FROM walrelay.ddl_publish WHERE publication = $1",
                &[&publication],
            )
            .await?;
        for p in patterns {
            client
                .execute(
                    "INSERT INTO walrelay.ddl_publish (publication, schema_name, table_name) VALUES ($1, $2, $3)",
                    &[&publication, &p.schema.exact(), &p.table.exact()],
                )
                .await?;
        }
        client.batch_execute("COMMIT").await
    }
    .await;
    if let Err(e) = result {
        let _ = client.batch_execute("ROLLBACK").await;
        return Err(err(e));
    }
    tracing::debug!(publication = %quote::ident(publication), "DDL capture triggers ready");
    Ok(())
}

//! From the trigger's message to the `Ddl` change the sinks see: which replicated tables
//! the command touched (by their names on the targets, with their new shape), whether it
//! concerns the replicated tables at all, and whether a target can run it as it is.

use std::sync::Arc;

use serde::Deserialize;
use walrelay_model::{Ddl, DdlAction, DdlColumn, DdlTable, Oid};

use super::statement;
use crate::sets::{Plan, TableShape};

/// The trigger's message (`ddl::capture`).
#[derive(Debug, Deserialize)]
struct Message {
    tag: String,
    statement: String,
    search_path: String,
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    objects: Vec<Object>,
    #[serde(default)]
    dropped: Vec<Dropped>,
    #[serde(default)]
    tables: Vec<Table>,
}

#[derive(Debug, Deserialize)]
struct Object {
    schema: Option<String>,
    /// The table the object belongs to (itself for a table), when it has one.
    table: Option<i64>,
}

#[derive(Debug, Deserialize)]
struct Dropped {
    oid: i64,
    /// Named by the command itself, not dropped along with something else.
    #[serde(default)]
    original: bool,
    #[serde(rename = "type")]
    kind: String,
    schema: Option<String>,
    name: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Table {
    oid: i64,
    schema: String,
    name: String,
    /// A partition's root table.
    root: Option<(String, String)>,
    columns: Vec<Column>,
    primary_key: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct Column {
    name: String,
    #[serde(rename = "type")]
    type_name: String,
    nullable: bool,
}

/// What the relay knows of a source table.
pub enum TableRole {
    /// A set captures it, with this shape.
    Captured(Arc<TableShape>),
    /// A set's pattern takes it (created, or renamed into it, since the start).
    New(Box<TableShape>),
    Not,
}

impl TableRole {
    /// The role of a table by its oid, else by its name (tables created since the start).
    pub fn of(
        plan: &Plan,
        known: &std::collections::HashMap<Oid, Arc<TableShape>>,
        oid: Option<Oid>,
        schema: &str,
        name: &str,
    ) -> TableRole {
        if let Some(shape) = oid.and_then(|o| known.get(&o).or_else(|| plan.shape_by_oid(o))) {
            return TableRole::Captured(shape.clone());
        }
        if let Some(shape) = plan.shape_for(schema, name) {
            return TableRole::Captured(shape.clone());
        }
        match plan.shape_for_new(schema, name) {
            Some(shape) => TableRole::New(Box::new(shape)),
            None => TableRole::Not,
        }
    }
}

/// The change for a trigger message, or `None` (logged) when the command concerns no
/// replicated table. `role` tells what a table is to the relay.
pub fn from_message(
    content: &[u8],
    plan: &Plan,
    role: impl Fn(Option<Oid>, &str, &str) -> TableRole,
) -> Result<Option<Ddl>, String> {
    let msg: Message = serde_json::from_slice(content)
        .map_err(|e| format!("a DDL message from the source trigger is not as expected: {e}"))?;
    let creates = msg.tag.starts_with("CREATE TABLE") || msg.tag == "SELECT INTO";
    let mut tables = Vec::new();
    let mut shaped = Vec::new();
    let mut add = |role: TableRole, (schema, name): (&str, &str), action, columns, pk| {
        let (set, target) = match role {
            TableRole::Captured(s) if s.is_unchanged() => (s.set.clone(), None),
            TableRole::Captured(s) => {
                shaped.push(format!("{} (set {:?})", s.shown(), s.set));
                (s.set.clone(), Some(s.target.clone()))
            }
            TableRole::New(s) => (s.set.clone(), None),
            TableRole::Not => return,
        };
        // A table the sets leave as it is has the source's name, the new one if renamed.
        let (schema, name) = target.unwrap_or((schema.to_string(), name.to_string()));
        tables.push(DdlTable {
            schema,
            name,
            action,
            set: Some(set),
            columns,
            primary_key: pk,
        });
    };
    for t in &msg.tables {
        let columns = t
            .columns
            .iter()
            .map(|c| DdlColumn {
                name: c.name.clone(),
                type_name: c.type_name.clone(),
                nullable: c.nullable,
            })
            .collect();
        let action = if creates {
            DdlAction::Create
        } else {
            DdlAction::Alter
        };
        // A partition is part of its root, which the publication publishes it through:
        // the change is to the root.
        match &t.root {
            Some((schema, name)) => add(
                role(None, schema, name),
                (schema, name),
                DdlAction::Alter,
                columns,
                t.primary_key.clone(),
            ),
            None => add(
                role(Some(t.oid as Oid), &t.schema, &t.name),
                (&t.schema, &t.name),
                action,
                columns,
                t.primary_key.clone(),
            ),
        }
    }
    let mut other_objects = false;
    for d in &msg.dropped {
        match (d.kind.as_str(), &d.schema, &d.name) {
            ("table", Some(schema), Some(name)) => add(
                role(Some(d.oid as Oid), schema, name),
                (schema, name),
                DdlAction::Drop,
                Vec::new(),
                Vec::new(),
            ),
            // Columns, constraints and defaults go with their table's ALTER, which the
            // command's objects name; the rest (indexes, sequences, types) by schema, if
            // the command named them: what goes with a table (its row type, its indexes)
            // is the table's, and an unreplicated table's DROP is not for the targets.
            ("table column" | "table constraint" | "default value", _, _) => {}
            (_, Some(schema), _) if d.original => other_objects |= plan.covers_schema(schema),
            _ => {}
        }
    }
    for o in msg.objects.iter().filter(|o| o.table.is_none()) {
        if let Some(schema) = &o.schema {
            other_objects |= plan.covers_schema(schema);
        }
    }
    let touches_tables = msg.objects.iter().any(|o| o.table.is_some());
    if tables.is_empty() && (touches_tables || !other_objects) {
        tracing::info!(command = %msg.statement, "schema change of no replicated table: not sent");
        return Ok(None);
    }
    let unsafe_reason = unsafe_reason(&msg.tag, &msg.statement, &shaped);
    Ok(Some(Ddl {
        tag: msg.tag,
        statement: msg.statement,
        search_path: msg.search_path,
        role: msg.role,
        tables,
        unsafe_reason,
    }))
}

/// Why a target cannot run `statement` as the source ran it, if it cannot.
fn unsafe_reason(tag: &str, statement: &str, shaped: &[String]) -> Option<String> {
    if !shaped.is_empty() {
        return Some(format!(
            "it changes {}, which the sets reshape (name, columns or values differ on the targets), and it names the source's",
            shaped.join(", ")
        ));
    }
    let statements = statement::statements(statement);
    if statements.len() != 1 {
        return Some(format!(
            "it ran in a query string of {} statements, which cannot be told apart",
            statements.len()
        ));
    }
    let expected = tag.split(' ').next().unwrap_or_default();
    match statement::first_word(statement) {
        Some(w) if w == expected => {}
        Some(w) => {
            return Some(format!(
                "it ran inside a {w} statement (a function or DO block): replaying that would run the rest of it again"
            ))
        }
        None => return Some("its statement text is empty".into()),
    }
    if tag == "CREATE TABLE AS" || tag == "SELECT INTO" {
        return Some(
            "it fills a new table from a query, and the stream does not carry those rows".into(),
        );
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_is_unsafe_when_its_text_is_not_the_command() {
        assert_eq!(
            unsafe_reason("ALTER TABLE", "alter table t add b int;", &[]),
            None
        );
        assert!(unsafe_reason(
            "ALTER TABLE",
            "DO $$ BEGIN ALTER TABLE t ADD b int; END $$",
            &[]
        )
        .unwrap()
        .contains("DO statement"));
        assert!(unsafe_reason(
            "ALTER TABLE",
            "ALTER TABLE t ADD b int; INSERT INTO t VALUES (1)",
            &[]
        )
        .unwrap()
        .contains("2 statements"));
        assert!(
            unsafe_reason("ALTER TABLE", "ALTER TABLE t ADD b int", &["t".into()])
                .unwrap()
                .contains("reshape")
        );
    }

    #[test]
    fn a_message_touching_only_other_tables_is_left_out() {
        let plan = Plan::unshaped("default", &[("public", "kept")]);
        let msg = br#"{"tag":"ALTER TABLE","statement":"ALTER TABLE other ADD b int","search_path":"public",
            "objects":[{"type":"table","schema":"public","identity":"public.other","table":2}],
            "dropped":[],"tables":[{"oid":2,"schema":"public","name":"other","root":null,"columns":[],"primary_key":[]}]}"#;
        let role = |_: Option<Oid>, s: &str, n: &str| match plan.shape_for(s, n) {
            Some(shape) => TableRole::Captured(shape.clone()),
            None => TableRole::Not,
        };
        assert_eq!(from_message(msg, &plan, role).unwrap(), None);
        let msg = br#"{"tag":"ALTER TABLE","statement":"ALTER TABLE kept ADD b int","search_path":"public",
            "objects":[{"type":"table","schema":"public","identity":"public.kept","table":1}],
            "dropped":[],"tables":[{"oid":1,"schema":"public","name":"kept","root":null,
            "columns":[{"name":"b","type":"integer","nullable":true}],"primary_key":[]}]}"#;
        let ddl = from_message(msg, &plan, role).unwrap().unwrap();
        assert_eq!(ddl.tables.len(), 1);
        assert_eq!(ddl.tables[0].columns[0].type_name, "integer");
        assert_eq!(ddl.unsafe_reason, None);
    }

    #[test]
    fn dropping_an_unreplicated_table_is_not_sent_even_with_its_index_in_a_replicated_schema() {
        let plan = Plan::unshaped("default", &[("public", "kept")]);
        let role = |_: Option<Oid>, s: &str, n: &str| match plan.shape_for(s, n) {
            Some(shape) => TableRole::Captured(shape.clone()),
            None => TableRole::Not,
        };
        let msg = br#"{"tag":"DROP TABLE","statement":"DROP TABLE local_only","search_path":"public",
            "objects":[],"tables":[],"dropped":[
              {"oid":5,"type":"table","schema":"public","name":"local_only","identity":"public.local_only","original":true},
              {"oid":6,"type":"index","schema":"public","name":"local_only_pkey","identity":"public.local_only_pkey","original":false},
              {"oid":7,"type":"type","schema":"public","name":"local_only","identity":"public.local_only","original":false}]}"#;
        assert_eq!(from_message(msg, &plan, role).unwrap(), None);
        let msg = br#"{"tag":"DROP TYPE","statement":"DROP TYPE mood","search_path":"public",
            "objects":[],"tables":[],"dropped":[
              {"oid":8,"type":"type","schema":"public","name":"mood","identity":"public.mood","original":true}]}"#;
        let ddl = from_message(msg, &plan, role).unwrap().unwrap();
        assert!(ddl.tables.is_empty());
    }
}

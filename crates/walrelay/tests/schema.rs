//! Target schema creation from the source catalog: the target ends up with the same
//! definitions as the source, read back the same way.

use walrelay::schema::{self, catalog, TargetTable};
use walrelay_testkit::TestPg;

pub const SOURCE_SCHEMA: &str = r#"
    CREATE SCHEMA "Sales";
    CREATE TYPE mood AS ENUM ('sad', 'happy', 'it''s complicated');
    CREATE DOMAIN positive AS integer NOT NULL CHECK (VALUE > 0);
    CREATE DOMAIN feeling AS mood DEFAULT 'happy';
    CREATE TYPE address AS (street text, zip "char"[], mood mood);
    CREATE TYPE floatrange AS RANGE (subtype = float8);
    CREATE TABLE "Sales".orders (
        id serial PRIMARY KEY,
        ref bigint GENERATED ALWAYS AS IDENTITY (START WITH 100 INCREMENT BY 5),
        qty positive,
        price numeric(10, 2) NOT NULL DEFAULT 0,
        total numeric GENERATED ALWAYS AS (qty * price) STORED,
        moods mood[],
        feel feeling,
        ship address,
        window_ floatrange,
        note text COLLATE "C",
        created timestamptz DEFAULT now(),
        CONSTRAINT price_ok CHECK (price >= 0),
        UNIQUE (ref)
    );
    CREATE INDEX orders_created ON "Sales".orders (created DESC) WHERE note IS NOT NULL;
    CREATE TABLE "Sales".lines (id int PRIMARY KEY, order_id int REFERENCES "Sales".orders (id));
    CREATE TABLE events (id int, at date NOT NULL, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
    CREATE TABLE events_2026 PARTITION OF events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01') PARTITION BY HASH (id);
    CREATE TABLE events_2026_a PARTITION OF events_2026 FOR VALUES WITH (MODULUS 2, REMAINDER 0);
    CREATE TABLE events_2026_b PARTITION OF events_2026 FOR VALUES WITH (MODULUS 2, REMAINDER 1);
    CREATE TABLE events_other PARTITION OF events DEFAULT;
    INSERT INTO "Sales".orders (qty, price, moods) VALUES (1, 2, '{sad}'), (2, 3, '{happy}');
"#;

async fn definitions(
    client: &tokio_postgres::Client,
    tables: &[(&str, &str)],
) -> Vec<catalog::TableDef> {
    catalog::prepare_session(client).await.unwrap();
    let mut out = Vec::new();
    for (s, t) in tables {
        out.push(catalog::read_table(client, s, t).await.unwrap());
    }
    out
}

#[tokio::test]
async fn the_target_gets_the_sources_definitions() {
    let (source_pg, target_pg) = (TestPg::start(), TestPg::start());
    let source = source_pg.create_db("app").await;
    let target = target_pg.create_db("app").await;
    source.batch_execute(SOURCE_SCHEMA).await.unwrap();
    let tables = [
        ("Sales", "orders"),
        ("Sales", "lines"),
        ("public", "events"),
    ];
    let defs = definitions(&source, &tables).await;
    schema::prepare_target_session(&target).await.unwrap();
    for def in &defs {
        assert_eq!(
            schema::prepare_target(&target, def).await.unwrap(),
            TargetTable::Created
        );
    }
    // A second run finds them and checks them instead.
    for def in &defs {
        assert_eq!(
            schema::prepare_target(&target, def).await.unwrap(),
            TargetTable::Existing
        );
    }
    for def in &defs {
        schema::finish_target(&target, def).await.unwrap();
    }
    let created = definitions(&target, &tables).await;
    assert_eq!(created, defs, "the target reads back as the source");

    // Generated and identity columns work on the target as on the source.
    target
        .batch_execute(r#"INSERT INTO "Sales".orders (qty, price) VALUES (3, 4)"#)
        .await
        .unwrap();
    let (id, r, total): (i32, i64, String) = {
        let row = target
            .query_one(r#"SELECT id, ref, total::text FROM "Sales".orders"#, &[])
            .await
            .unwrap();
        (row.get(0), row.get(1), row.get(2))
    };
    assert_eq!(
        (id, r, total.as_str()),
        (3, 110, "12.00"),
        "sequences continue where the source's were"
    );
}

#[tokio::test]
async fn an_incompatible_target_table_is_named() {
    let (source_pg, target_pg) = (TestPg::start(), TestPg::start());
    let source = source_pg.create_db("app").await;
    let target = target_pg.create_db("app").await;
    source
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    let def = definitions(&source, &[("public", "t")]).await.remove(0);
    schema::prepare_target_session(&target).await.unwrap();
    target
        .batch_execute("CREATE TABLE public.t (id int PRIMARY KEY, v integer)")
        .await
        .unwrap();
    let e = schema::prepare_target(&target, &def)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("target table public.t")
            && e.contains("\"v\" is integer on the target but text on the source"),
        "{e}"
    );
    target.batch_execute("DROP TABLE public.t; CREATE TABLE public.t (id int PRIMARY KEY, v text, extra int NOT NULL)").await.unwrap();
    let e = schema::prepare_target(&target, &def)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("\"extra\" is NOT NULL without a default"), "{e}");
}

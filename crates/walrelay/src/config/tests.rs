use super::*;

const MINIMAL: &str = r#"
[source]
url = "postgresql://rep@db/app"
tables = ["public.orders"]

[[sink]]
type = "jsonl"
path = "-"
"#;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("test.toml"))
}

fn error(text: &str) -> String {
    parse(text).unwrap_err().to_string()
}

#[test]
fn minimal_config_gets_defaults() {
    let c = parse(MINIMAL).unwrap();
    assert_eq!(c.source.slot, "walrelay");
    assert_eq!(c.source.publication, "walrelay");
    assert_eq!(c.source.status_interval, Duration::from_secs(1));
    assert!(c.source.messages);
    assert_eq!(c.sinks[0].name(), "jsonl");
}

#[test]
fn unknown_keys_are_named() {
    let e = error(&MINIMAL.replace("[source]", "[source]\nslott = \"x\""));
    assert!(e.contains("unknown field `slott`"), "{e}");
    assert!(e.starts_with("test.toml:3:"), "{e}");
    let e = error(&MINIMAL.replace("path = \"-\"", "path = \"-\"\nfsink = true"));
    assert!(e.contains("unknown field `fsink`"), "{e}");
    let e = error(&format!("{MINIMAL}\n[extra]\na = 1\n"));
    assert!(e.contains("unknown field `extra`"), "{e}");
    let e = error(&MINIMAL.replace("\"jsonl\"", "\"kafka\""));
    assert!(e.contains("kafka"), "{e}");
    assert!(!e.contains('\n'), "one line: {e}");
}

#[test]
fn invalid_values_are_named() {
    let e = error(&MINIMAL.replace("postgresql://rep@db/app", "host=db bogus=1"));
    assert!(e.contains("source.url") && e.contains("bogus"), "{e}");
    let e = error(&MINIMAL.replace("[source]", "[source]\nslot = \"My-Slot\""));
    assert!(e.contains("source.slot"), "{e}");
    let e = error(&MINIMAL.replace("[\"public.orders\"]", "[]"));
    assert!(e.contains("source.tables"), "{e}");
    let e = error(&MINIMAL.replace("[\"public.orders\"]", "[\"a.b.c\"]"));
    assert!(e.contains("too many dots"), "{e}");
    let e = error(&MINIMAL.replace("[source]", "[source]\nstatus_interval = \"soon\""));
    assert!(e.contains("status_interval") || e.contains("soon"), "{e}");
    let e = error("[source]\nurl = \"host=db\"\ntables=[\"t\"]\n");
    assert!(e.contains("sink"), "{e}");
    let two = format!("{MINIMAL}\n[[sink]]\ntype = \"jsonl\"\npath = \"out.jsonl\"\n");
    let e = error(&two);
    assert!(e.contains("distinct name"), "{e}");
    // Several hosts: the source finds the primary among them; a sink takes one.
    let several = MINIMAL.replace(
        "rep@db/app",
        "rep@db1,db2/app?target_session_attrs=read-write",
    );
    assert!(parse(&several).is_ok());
    let sink = several.replace(
        "type = \"jsonl\"\npath = \"-\"",
        "type = \"postgres\"\nurl = \"host=t1,t2 dbname=app\"",
    );
    let e = error(&sink);
    assert!(e.contains("sink[0].url") && e.contains("one host"), "{e}");
}

#[test]
fn key_ranges_need_a_node_among_the_nodes_and_origin_none() {
    let with = |ranges: &str| {
        MINIMAL.replace(
            "[source]",
            &format!("[source]\norigin = \"none\"\nkey_ranges = {ranges}"),
        )
    };
    let config = parse(&with("{ node = 2, nodes = 2 }")).unwrap();
    assert_eq!(
        config.source.key_ranges,
        Some(KeyRanges { node: 2, nodes: 2 })
    );
    for bad in [
        "{ node = 0, nodes = 2 }",
        "{ node = 3, nodes = 2 }",
        "{ node = 1, nodes = 1 }",
    ] {
        let e = error(&with(bad));
        assert!(
            e.contains("source.key_ranges") && e.contains("1 to nodes"),
            "{bad}: {e}"
        );
    }
    let e = error(&with("{ node = 1, nodes = 2 }").replace("origin = \"none\"\n", ""));
    assert!(
        e.contains("source.key_ranges") && e.contains("origin"),
        "{e}"
    );
}

#[test]
fn set_errors_name_the_key_and_the_fix() {
    let set = |body: &str| format!("{MINIMAL}\n[[set]]\nname = \"s\"\n{body}\n");
    for (text, key, said) in [
        (
            set("[[set.table]]\nname = \"public.a\"\ntransform = { x = \"hash\" }"),
            "set[0].hash_key",
            "give the set a hash_key",
        ),
        (
            set("[[set.table]]\nname = \"public.*\""),
            "set[0].table[0].name",
            "is a pattern",
        ),
        (
            set("[[set.table]]\nname = \"public.a\"\ntransform = { x = \"scramble\" }"),
            "set[0].table[0].transform.x",
            "is not a transform",
        ),
        (
            set("[[set.table]]\nname = \"public.a\"\nrename_columns = { x = \"z\", y = \"z\" }"),
            "rename_columns",
            "two columns are renamed",
        ),
        (
            set("tables = [\"public.a\"]\n[[set]]\nname = \"s\"\ntables = [\"public.b\"]"),
            "set[1].name",
            "names two sets",
        ),
        (set(""), "set[0].tables", "list at least one table"),
        (
            format!("{MINIMAL}\n[[set]]\nname = \"default\"\ntables = [\"public.a\"]\n"),
            "set.name",
            "source.tables makes",
        ),
        (
            set("tables = [\"public.a\"]")
                .replace("path = \"-\"", "path = \"-\"\nsets = [\"nope\"]"),
            "sink[0].sets",
            "no set is named \"nope\"",
        ),
    ] {
        let e = error(&text);
        assert!(e.contains(key) && e.contains(said), "{text}\n=> {e}");
    }
    let ok = parse(&set("hash_key = \"k\"\n[[set.table]]\nname = \"public.a\"\ntransform = { x = \"hash\", y = { mask = 2 }, z = { constant = \"c\" } }")).unwrap();
    assert_eq!(
        ok.sets().len(),
        2,
        "source.tables is the set default, beside s"
    );
    assert!(
        !format!("{ok:?}").contains("hash_key: Some(Secret(\"k\"))"),
        "the key stays out of logs"
    );
}

#[test]
fn password_is_hidden_in_debug() {
    let c = parse(&MINIMAL.replace("rep@db", "rep:s3cret@db")).unwrap();
    let shown = format!("{c:?}");
    assert!(!shown.contains("s3cret"), "{shown}");
}

/// Every key of the configuration, as `section.key` paths, from a config with every
/// optional key and every sink type set.
fn all_key_paths() -> Vec<String> {
    let mut config = parse(MINIMAL).unwrap();
    config.source.spill_dir = Some("/var/lib/walrelay/spill".into());
    config.source.key_ranges = Some(KeyRanges { node: 1, nodes: 2 });
    let postgres = format!("{MINIMAL}\n[[sink]]\ntype = \"postgres\"\nurl = \"host=replica\"\non_conflict_tables = {{ \"public.a\" = \"keep_local\" }}\n");
    config
        .sinks
        .extend(parse(&postgres).unwrap().sinks.into_iter().skip(1));
    let amqp = format!("{MINIMAL}\n[[sink]]\ntype = \"amqp\"\nurl = \"amqp://localhost\"\ntls_ca_file = \"ca.pem\"\nalternate_exchange = \"unrouted\"\nqueues = [{{ name = \"q\" }}]\n");
    config
        .sinks
        .extend(parse(&amqp).unwrap().sinks.into_iter().skip(1));
    let sets = format!("{MINIMAL}\n[[set]]\nname = \"s\"\ntables = [\"public.a\"]\nhash_key = \"k\"\nsequences = [\"public.n\"]\n[[set.table]]\nname = \"public.b\"\nwhere = \"id > 0\"\ncolumns = [\"id\", \"x\"]\ntarget = \"other.b\"\nrename_columns = {{ x = \"y\" }}\ntransform = {{ x = \"hash\" }}\nidentity = \"full\"\n");
    let with_sets = parse(&sets).unwrap();
    config.sets = with_sets.sets;
    if let Some(SinkConfig::Jsonl(j)) = config.sinks.first_mut() {
        j.sets = Some(vec!["s".into()]);
    }
    let value = toml::Value::try_from(&config).unwrap();
    let mut paths = Vec::new();
    collect_paths(&value, "", &mut paths);
    // Maps keyed by column name: one row in the docs covers each.
    for p in paths.iter_mut() {
        for map in [
            "set.table.transform",
            "set.table.rename_columns",
            "sink.on_conflict_tables",
        ] {
            if p.starts_with(&format!("{map}.")) {
                *p = map.to_string();
            }
        }
    }
    paths.sort();
    paths.dedup();
    paths
}

fn collect_paths(value: &toml::Value, prefix: &str, out: &mut Vec<String>) {
    match value {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                match v {
                    toml::Value::Table(_) => collect_paths(v, &path, out),
                    toml::Value::Array(items)
                        if items.iter().all(|i| i.is_table()) && !items.is_empty() =>
                    {
                        for item in items {
                            collect_paths(item, &path, out);
                        }
                    }
                    _ => out.push(path),
                }
            }
        }
        _ => out.push(prefix.to_string()),
    }
}

const DOC: &str = include_str!("../../../../docs/config.md");

#[test]
fn every_key_is_documented_with_its_default() {
    for path in all_key_paths() {
        let row = DOC
            .lines()
            .find(|l| l.starts_with(&format!("| `{path}` |")))
            .unwrap_or_else(|| panic!("docs/config.md has no table row for `{path}`"));
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        assert!(
            cells.len() >= 4 && !cells[2].is_empty(),
            "row for `{path}` needs a default: {row}"
        );
    }
}

/// Every key of a `walrelay consume` file (`target.*` stands for the postgres sink's keys).
fn consume_key_paths() -> Vec<String> {
    let text = "[consume]\nurl = \"amqp://localhost\"\nqueue = \"q\"\ntls_ca_file = \"ca.pem\"\ndead_letter_queue = \"d\"\n[target]\nurl = \"host=replica\"\n";
    let config = ConsumeConfig::parse(text, Path::new("consume.toml")).unwrap();
    key_paths_with(&config, "target.", "target.*")
}

/// The key paths of `config`, those under `nested` stood for by `stand_in` (one row in the
/// docs covers them).
fn key_paths_with(config: &impl serde::Serialize, nested: &str, stand_in: &str) -> Vec<String> {
    let value = toml::Value::try_from(config).unwrap();
    let mut paths = Vec::new();
    collect_paths(&value, "", &mut paths);
    paths.retain(|p| !p.starts_with(nested));
    paths.push(stand_in.into());
    paths
}

fn assert_documented(paths: Vec<String>) {
    for path in paths {
        assert!(
            DOC.lines().any(|l| l.starts_with(&format!("| `{path}` |"))),
            "docs/config.md has no table row for `{path}`"
        );
    }
}

#[test]
fn every_consume_key_is_documented() {
    assert_documented(consume_key_paths());
}

#[test]
fn consume_config_errors_name_the_key() {
    for (text, expected) in [
        ("[consume]\nurl = \"http://x\"\nqueue = \"q\"\n[target]\nurl = \"host=a\"\n", "consume.url"),
        ("[consume]\nurl = \"amqp://x\"\nqueue = \"\"\n[target]\nurl = \"host=a\"\n", "consume.queue"),
        ("[consume]\nurl = \"amqp://x\"\nqueue = \"q\"\nprefetch = 0\n[target]\nurl = \"host=a\"\n", "consume.prefetch"),
        ("[consume]\nurl = \"amqp://x\"\nqueue = \"q\"\n", "target"),
    ] {
        let e = ConsumeConfig::parse(text, Path::new("c.toml")).unwrap_err().to_string();
        assert!(e.contains(expected), "{text}: {e}");
    }
    let e = ConsumeConfig::parse(
        "[consume]\nurl = \"amqp://guest:hunter2@x\"\nqueue = \"q\"\n[target]\nurl = \"host=a\"\n",
        Path::new("c.toml"),
    )
    .unwrap();
    assert!(
        !format!("{e:?}").contains("hunter2"),
        "the password is hidden"
    );
}

const HA_API: &str = "[api]\ntoken = \"t0ken\"\ncertfile = \"api.pem\"\nkeyfile = \"api.key\"\ncafile = \"ca.pem\"\n";

const HA_MINIMAL: &str = "[node]\nname = \"n1\"\nbase_dir = \"/x\"\nport = 5432\napi = \"127.0.0.1:8008\"\n[cluster]\nname = \"c\"\netcd = [\"http://e:2379\"]\n";

/// Every key of a `walrelay ha` file.
fn ha_key_paths() -> Vec<String> {
    let text = format!(
        "{HA_MINIMAL}slot_wal_limit = 1\n[postgres]\nsuperuser_password = \"a\"\nreplication_password = \"b\"\nhba = [\"host all all 0/0 reject\"]\nsettings = {{ a = \"1\" }}\n{HA_API}"
    );
    let config = ha::HaConfig::parse(&text, Path::new("node.toml")).unwrap();
    key_paths_with(&config, "postgres.settings.", "postgres.settings")
}

#[test]
fn every_ha_key_is_documented() {
    assert_documented(ha_key_paths());
}

#[test]
fn ha_config_defaults_and_errors_name_the_key() {
    let c = ha::HaConfig::parse(HA_MINIMAL, Path::new("n.toml")).unwrap();
    assert_eq!(c.cluster.ttl, Duration::from_secs(8));
    assert_eq!(c.cluster.prefix(), "/walrelay/c/");
    assert!(c.policy().validate().is_ok());
    for (from, to, key) in [
        ("name = \"n1\"", "name = \"N-1\"", "node.name"),
        ("port = 5432", "port = 0", "node.port"),
        (
            "api = \"127.0.0.1:8008\"",
            "api = \"localhost\"",
            "node.api",
        ),
        ("etcd = [\"http://e:2379\"]", "etcd = []", "cluster.etcd"),
        ("name = \"c\"", "name = \"a/b\"", "cluster.name"),
        (
            "[cluster]",
            "[cluster]\nretry_timeout = \"4s\"",
            "must not exceed ttl",
        ),
        ("[cluster]", "[cluster]\nttl = \"1s\"", "cluster.ttl"),
        (
            "[cluster]",
            "[cluster]\nloop_wait = \"0s\"",
            "cluster.loop_wait",
        ),
        (
            "[cluster]",
            "[cluster]\ntll = \"8s\"",
            "unknown field `tll`",
        ),
    ] {
        let text = HA_MINIMAL.replacen(from, to, 1);
        let e = ha::HaConfig::parse(&text, Path::new("n.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains(key), "{to}: {e}");
    }
    assert_eq!(
        c.postgres.unset_passwords(),
        [
            "postgres.superuser_password",
            "postgres.replication_password"
        ]
    );
    assert_eq!(
        c.postgres.superuser_password(),
        "walrelay",
        "the documented default"
    );
    let secret = format!(
        "{HA_MINIMAL}[postgres]\nsuperuser_password = \"hunter2\"\n[api]\ntoken = \"t0p-s3cret\"\n"
    );
    let c = ha::HaConfig::parse(&secret, Path::new("n.toml")).unwrap();
    assert_eq!(
        c.postgres.unset_passwords(),
        ["postgres.replication_password"]
    );
    assert_eq!(c.postgres.superuser_password(), "hunter2");
    let shown = format!("{c:?}");
    assert!(
        !shown.contains("hunter2") && !shown.contains("t0p-s3cret"),
        "passwords and tokens stay out of logs: {shown}"
    );
    for (api, key) in [
        ("[api]\ncertfile = \"a.pem\"\n", "api.keyfile"),
        ("[api]\nkeyfile = \"a.key\"\n", "api.certfile"),
        ("[api]\ntoken = \" \"\n", "api.token"),
        ("[api]\ntokn = \"x\"\n", "unknown field `tokn`"),
    ] {
        let text = format!("{HA_MINIMAL}{api}");
        let e = ha::HaConfig::parse(&text, Path::new("n.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains(key), "{api}: {e}");
    }
    // Logical slots kept on replicas: names, prefixes with `*`, or `*` alone.
    let slots = |list: &str| {
        ha::HaConfig::parse(
            &HA_MINIMAL.replace(
                "[cluster]\n",
                &format!("[cluster]\nlogical_slots = {list}\n"),
            ),
            Path::new("n.toml"),
        )
    };
    let c = slots(r#"["*", "walrelay*", "debezium"]"#).unwrap();
    assert!(c.cluster.keeps_logical_slot("anything"));
    for bad in [r#"["Mixed*"]"#, r#"[""]"#, r#"["a-b"]"#] {
        let e = slots(bad).unwrap_err().to_string();
        assert!(e.contains("cluster.logical_slots"), "{bad}: {e}");
    }
    // ctl reads `[cluster]` and `[api]`, whatever else the file holds.
    let ctl = ha::CtlConfig::parse(&format!("{HA_MINIMAL}{HA_API}"), Path::new("n.toml")).unwrap();
    assert_eq!(ctl.api.token.as_deref(), Some("t0ken"));
    assert!(ha::CtlConfig::parse(
        &format!("{HA_MINIMAL}[api]\ncertfile = \"a.pem\"\n"),
        Path::new("n.toml")
    )
    .unwrap_err()
    .to_string()
    .contains("api.keyfile"));
}

#[test]
fn documented_keys_exist() {
    let mut known = all_key_paths();
    known.extend(consume_key_paths());
    known.extend(ha_key_paths());
    for line in DOC.lines().filter(|l| l.starts_with("| `")) {
        let key = line.split('`').nth(1).unwrap();
        assert!(
            known.iter().any(|k| k == key),
            "docs/config.md documents `{key}`, which the config does not have"
        );
    }
}

#[test]
fn documented_example_parses() {
    let example = DOC
        .split("```toml")
        .nth(1)
        .and_then(|s| s.split("```").next())
        .expect("docs/config.md has a ```toml example");
    parse(example).unwrap();
}

#[test]
fn conflict_policies_have_their_two_writer_names_per_sink_and_per_table() {
    let c = parse(&format!(
        "{MINIMAL}\n[[sink]]\ntype = \"postgres\"\nurl = \"host=b\"\non_conflict = \"keep_local\"\n\
         on_conflict_tables = {{ \"public.a\" = \"apply_remote\", \"public.b\" = \"last_writer_wins\" }}\n"
    ))
    .unwrap();
    let Some(SinkConfig::Postgres(p)) = c.sinks.last() else {
        panic!("a postgres sink")
    };
    assert_eq!(p.on_conflict, OnConflict::Skip);
    assert_eq!(p.on_conflict_tables["public.a"], OnConflict::Apply);
    assert_eq!(p.on_conflict_tables["public.b"], OnConflict::LastWriterWins);
    assert!(p.uses_last_writer_wins());
    let e = error(&format!(
        "{MINIMAL}\n[[sink]]\ntype = \"postgres\"\nurl = \"host=b\"\non_conflict = \"newest\"\n"
    ));
    assert!(e.contains("newest"), "{e}");
}

#[test]
fn trigger_capture_refuses_what_it_does_not_take_yet() {
    let trigger = MINIMAL.replace("[source]", "[source]\ncapture = \"trigger\"");
    assert_eq!(
        parse(&trigger).unwrap().source.capture,
        CaptureMethod::Trigger
    );
    // Two writable nodes: the log records what walrelay applied.
    parse(&trigger.replace("capture =", "origin = \"none\"\ncapture =")).unwrap();
    let e = error(&format!("{trigger}\n[ddl]\nmode = \"statements\"\n"));
    assert!(e.contains("ddl.mode"), "{e}");
    // Row filters are taken: the triggers evaluate them.
    parse(&format!(
        "{trigger}\n[[set]]\nname = \"s\"\ntables = []\n[[set.table]]\nname = \"public.b\"\nwhere = \"id > 0\"\n"
    ))
    .unwrap();
}

#[test]
fn an_amqp_url_is_shown_without_its_password_even_one_holding_a_slash() {
    for (url, shown) in [
        (
            "amqp://relay:s3cret@rabbit:5672/%2f",
            "amqp://relay:***@rabbit:5672/%2f",
        ),
        (
            "amqps://relay:Ab/cd99@rabbit/vhost",
            "amqps://relay:***@rabbit/vhost",
        ),
        (
            "amqp://relay:Ab?cd99@rabbit/vhost",
            "amqp://relay:***@rabbit/vhost",
        ),
        ("amqp://rabbit/%2f", "amqp://rabbit/%2f"),
    ] {
        assert_eq!(AmqpUrl(url.into()).redacted(), shown);
    }
    for url in [
        "amqp://relay:Ab/cd99@rabbit/vhost",
        "amqp://relay:Ab?cd99@rabbit/vhost",
    ] {
        if let Err(err) = AmqpUrl(url.into()).check() {
            assert!(!err.contains("cd99"), "{err}");
        }
    }
}

//! Fan-out through RabbitMQ (the broker of this machine, 127.0.0.1:5672, guest/guest): the
//! `amqp` sink, and `walrelay consume` applying a queue to a replica exactly once, through
//! a killed consumer and a broker restart.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::Value as J;
use walrelay_testkit::{wait_for, TestPg};

use crate::support::*;

/// Names no other run of the tests uses.
fn unique(what: &str) -> String {
    format!("walrelay-test-{}-{what}", std::process::id())
}

async fn channel() -> (Connection, Channel) {
    let c = Connection::connect(BROKER, ConnectionProperties::default())
        .await
        .expect("the RabbitMQ of this machine at 127.0.0.1:5672");
    let ch = c.create_channel().await.unwrap();
    (c, ch)
}

async fn delete_queues(names: &[&str]) {
    let (_c, ch) = channel().await;
    for n in names {
        let _ = ch
            .queue_delete((*n).into(), QueueDeleteOptions::default())
            .await;
    }
}

/// Messages waiting in `queue`.
async fn queue_depth(queue: &str) -> u32 {
    let (_c, ch) = channel().await;
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap()
    .message_count()
}

/// Restart the broker's application: every connection is closed; durable queues and
/// persistent messages stay.
async fn restart_broker() {
    for args in [["stop_app"], ["start_app"]] {
        let out = std::process::Command::new("rabbitmqctl")
            .args(args)
            .output()
            .expect("rabbitmqctl");
        assert!(out.status.success(), "rabbitmqctl {args:?}: {out:?}");
    }
    wait_for(
        "the broker to accept connections",
        Duration::from_secs(60),
        || async {
            Connection::connect(BROKER, ConnectionProperties::default())
                .await
                .ok()
                .map(|_| ())
        },
    )
    .await;
}

/// A relay config: `tables` of `source_url` to an amqp sink with `sink` keys.
fn relay_config(dir: &Path, source_url: &str, tables: &[&str], sink: &str) -> PathBuf {
    let sinks = format!("[[sink]]\ntype = \"amqp\"\nurl = \"{BROKER}\"\n{sink}\n");
    relay_config_file(
        dir,
        source_url,
        tables,
        "status_interval = \"200ms\"",
        &sinks,
    )
}

const ACCOUNTS: &str = "CREATE TABLE acct (id int PRIMARY KEY, balance int8 NOT NULL, note text)";

/// Transactions of inserts, updates and deletes on `acct` until `stop`.
async fn start_load(pg: &TestPg, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    let c = pg.client("app").await;
    walrelay::task::spawn_named("test-load", async move {
        let mut i: i64 = 0;
        while !stop.load(Ordering::Relaxed) {
            i += 1;
            c.batch_execute(&format!(
                "BEGIN;
                 INSERT INTO acct VALUES ({}, {i}, 'tx ' || {i});
                 UPDATE acct SET balance = balance + 1 WHERE id = {};
                 DELETE FROM acct WHERE id = {};
                 COMMIT;",
                1000 + i,
                i % 200 + 1,
                1000 + i - 20
            ))
            .await
            .unwrap();
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        i as u64
    })
}

/// The original design, done properly: one source, a fanout exchange, a queue and a
/// consumer per replica. Under a write load one consumer is killed and restarted and the
/// broker is restarted; both replicas end equal to the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_through_a_fanout_survive_a_killed_consumer_and_a_broker_restart() {
    let (source_pg, target_pg) = (TestPg::start(), TestPg::start());
    let source = source_pg.create_db("app").await;
    source
        .batch_execute(&format!(
            "{ACCOUNTS}; INSERT INTO acct SELECT g, 0, 'before' FROM generate_series(1, 200) g"
        ))
        .await
        .unwrap();
    let r1 = target_pg.create_db("r1").await;
    let r2 = target_pg.create_db("r2").await;
    let r3 = target_pg.create_db("r3").await;
    for r in [&r1, &r2, &r3] {
        r.batch_execute(ACCOUNTS).await.unwrap();
    }
    let (q1, q2, exchange) = (unique("r1"), unique("r2"), unique("fanout"));
    let dir = tempfile::tempdir().unwrap();
    // One exchange, a queue per replica. A second sink publishes the same changes a
    // message per row, to a third queue that a third consumer applies: its 200 snapshot
    // rows are one target transaction of more messages than the prefetch window.
    let (q3, rows_exchange) = (unique("r3"), unique("rows"));
    let cfg = relay_config(
        dir.path(),
        &source_pg.url("app"),
        &["public.acct"],
        &format!(
            "exchange = \"{exchange}\"\nexchange_type = \"fanout\"\nchunk_bytes = 4096\nqueues = [{{ name = \"{q1}\" }}, {{ name = \"{q2}\", kind = \"quorum\" }}]\n\n[[sink]]\ntype = \"amqp\"\nname = \"rows\"\nurl = \"{BROKER}\"\nexchange = \"{rows_exchange}\"\nbatch = \"row\"\nqueues = [{{ name = \"{q3}\" }}]"
        ),
    );
    let c1_cfg = consume_config(dir.path(), "c1", &q1, &target_pg.url("r1"), "");
    let c2_cfg = consume_config(dir.path(), "c2", &q2, &target_pg.url("r2"), "");
    let c3_cfg = consume_config(dir.path(), "c3", &q3, &target_pg.url("r3"), "");
    let mut relay = Relay::start(&cfg);
    wait_until_streaming(&source, &mut relay).await;
    let c1 = Relay::start_consume(&c1_cfg);
    let mut c2 = Relay::start_consume(&c2_cfg);
    let mut c3 = Relay::start_consume(&c3_cfg);

    let stop = Arc::new(AtomicBool::new(false));
    let load = start_load(&source_pg, stop.clone()).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    c1.kill9().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut c1 = Relay::start_consume(&c1_cfg);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    restart_broker().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let transactions = load.await.unwrap();
    assert!(
        transactions > 50,
        "the load ran ({transactions} transactions)"
    );

    wait_until_equal(&source, &r1, &["acct"], &mut c1).await;
    wait_until_equal(&source, &r2, &["acct"], &mut c2).await;
    wait_until_equal(&source, &r3, &["acct"], &mut c3).await;
    relay.assert_running();
    let relay_log = relay.stop().await;
    let c1_log = c1.stop().await;
    let c2_log = c2.stop().await;
    let c3_log = c3.stop().await;
    assert!(
        relay_log.contains("pipeline interrupted; restarting"),
        "the relay lived through the broker restart:\n{relay_log}"
    );
    for log in [&c1_log, &c2_log, &c3_log] {
        assert!(
            log.contains("consumer interrupted; reconnecting"),
            "the consumer lived through the broker restart:\n{log}"
        );
    }
    for (who, log) in [("relay", &relay_log), ("c1", &c1_log), ("c2", &c2_log)] {
        for line in log.lines().filter(|l| l.contains("WARN")) {
            println!("{who}: {line}");
        }
    }
    println!(
        "{transactions} transactions; replicas equal to the source: {:?}",
        checksum(&source, "acct").await
    );
    delete_queues(&[&q1, &q2, &q3]).await;
}

/// Every message of `queue` until `done` says enough, deduplicated by `message_id` (if
/// `same_body_when_repeated`; otherwise repeats are kept): returns the messages' bodies and
/// headers in order, and how many repeated ids there were.
async fn drain(
    queue: &str,
    same_body_when_repeated: bool,
    mut done: impl FnMut(&[(Vec<u8>, BTreeMap<String, AMQPValue>)]) -> bool,
) -> (Vec<(Vec<u8>, BTreeMap<String, AMQPValue>)>, usize) {
    let (_c, ch) = channel().await;
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "test-drain".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut seen: HashMap<String, Vec<u8>> = HashMap::new();
    let mut messages = Vec::new();
    let mut repeats = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while !done(&messages) {
        let Ok(d) = tokio::time::timeout_at(deadline, consumer.next()).await else {
            let lines: Vec<J> = messages.iter().flat_map(|(b, _)| lines(b)).collect();
            let commits: std::collections::BTreeSet<_> = lines
                .iter()
                .filter(|l| l["kind"] == "commit")
                .map(position)
                .collect();
            let ids: std::collections::BTreeSet<i64> = lines
                .iter()
                .filter(|l| l["kind"] == "insert")
                .map(|l| l["new"]["id"].as_i64().unwrap())
                .collect();
            panic!(
                "the messages did not all arrive: {} messages, {} transactions, {} rows up to {:?}",
                messages.len(),
                commits.len(),
                ids.len(),
                ids.last()
            );
        };
        let d = d.unwrap().unwrap();
        d.ack(BasicAckOptions::default()).await.unwrap();
        let id = d
            .properties
            .message_id()
            .as_ref()
            .expect("every message has a message_id")
            .to_string();
        if let Some(earlier) = seen.get(&id) {
            repeats += 1;
            if same_body_when_repeated {
                assert_eq!(earlier, &d.data, "a repeat of {id} is the same message");
                continue;
            }
            // A group's repeat may hold more than the first message with its id: kept,
            // and its events deduplicated by position.
        }
        seen.insert(id, d.data.clone());
        let headers = d
            .properties
            .headers()
            .as_ref()
            .map(|h| {
                h.inner()
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.clone()))
                    .collect()
            })
            .unwrap_or_default();
        messages.push((d.data, headers));
    }
    (messages, repeats)
}

fn lines(body: &[u8]) -> Vec<J> {
    body.split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect()
}

/// `batch = "row"` or `"transaction"`: with the relay killed midway, every change reaches
/// a reader that drops repeats by `message_id` exactly once, with its headers.
async fn every_change_once(batch: &str) {
    let pg = TestPg::start();
    let db = pg.create_db("app").await;
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    let (queue, exchange) = (unique(&format!("{batch}-q")), unique(&format!("{batch}-x")));
    let dir = tempfile::tempdir().unwrap();
    let cfg = relay_config(
        dir.path(),
        &pg.url("app"),
        &["public.t"],
        &format!(
            "exchange = \"{exchange}\"\nbatch = \"{batch}\"\nchunk_bytes = 2048\nqueues = [{{ name = \"{queue}\", binding = \"#\" }}]"
        ),
    );
    let mut relay = Relay::start(&cfg);
    wait_until_streaming(&db, &mut relay).await;
    let mut next = 1;
    for round in 0..2 {
        for _ in 0..40 {
            db.batch_execute(&format!(
                "INSERT INTO t SELECT g, repeat('x', 50) FROM generate_series({next}, {}) g",
                next + 4
            ))
            .await
            .unwrap();
            next += 5;
        }
        if round == 0 {
            // A crash with messages in flight: what was not confirmed is published again.
            relay.kill9().await;
            relay = Relay::start(&cfg);
            wait_until_streaming(&db, &mut relay).await;
        }
    }
    // One transaction of 1,000 rows: chunks in batch = "transaction".
    db.batch_execute(&format!(
        "INSERT INTO t SELECT g, repeat('y', 50) FROM generate_series({next}, {}) g",
        next + 999
    ))
    .await
    .unwrap();
    let total = next + 999;
    // A group's bounds depend on timing, so after a restart a message with the same id
    // may hold more or fewer transactions: readers of groups drop repeats by position.
    let group = batch == "group";
    let (messages, repeats) = drain(&queue, !group, |m| {
        m.iter()
            .flat_map(|(b, _)| lines(b))
            .any(|l| l["kind"] == "insert" && l["new"]["id"] == total)
            && m.iter()
                .flat_map(|(b, _)| lines(b))
                .filter(|l| l["kind"] == "commit")
                .map(|l| position(&l))
                .collect::<std::collections::HashSet<_>>()
                .len()
                == 81
    })
    .await;
    relay.stop().await;
    let mut inserts: Vec<J> = messages
        .iter()
        .flat_map(|(b, _)| lines(b))
        .filter(|l| l["kind"] == "insert")
        .collect();
    if group {
        let mut seen = std::collections::HashSet::new();
        inserts.retain(|l| seen.insert(position(l)));
    }
    let mut ids: Vec<i64> = inserts
        .iter()
        .map(|l| l["new"]["id"].as_i64().unwrap())
        .collect();
    let received = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(
        received,
        ids.len(),
        "no change twice after dropping repeats"
    );
    assert_eq!(
        ids,
        (1..=i64::from(total)).collect::<Vec<_>>(),
        "every change"
    );
    for (body, headers) in &messages {
        let first = &lines(body)[0];
        let text = |k: &str| match headers.get(k) {
            Some(AMQPValue::LongString(s)) => s.to_string(),
            other => panic!("header {k}: {other:?}"),
        };
        assert_eq!(text("walrelay-lsn"), first["lsn"].as_str().unwrap());
        let op = text("walrelay-op");
        if batch == "row" {
            assert_eq!(op, first["kind"].as_str().unwrap());
            if op == "insert" {
                assert_eq!(text("walrelay-table"), "public.t");
            }
        } else {
            assert!(op == "transaction" || op == "snapshot", "{op}");
        }
        if group && first["kind"] == "begin" {
            assert!(
                lines(body).iter().all(|l| l["kind"] != "read"),
                "groups hold transactions"
            );
        }
        // A group holds several transactions: no one transaction's id in its headers.
        if first["kind"] != "snapshot_end" && !group {
            assert!(matches!(
                headers.get("walrelay-xid"),
                Some(AMQPValue::LongLongInt(_))
            ));
            assert!(headers.contains_key("walrelay-commit-time"));
        }
    }
    if batch != "row" {
        let chunked = messages.iter().any(
            |(_, h)| matches!(h.get("walrelay-chunk"), Some(AMQPValue::LongUInt(n)) if *n > 0),
        );
        assert!(chunked, "the 1,000-row transaction went out in chunks");
        let last: Vec<bool> = messages
            .iter()
            .filter_map(|(b, h)| {
                let ends = lines(b)
                    .last()
                    .is_some_and(|l| l["kind"] == "commit" || l["kind"] == "snapshot_end");
                match h.get("walrelay-last") {
                    Some(AMQPValue::Boolean(last)) => Some(*last == ends),
                    _ => None,
                }
            })
            .collect();
        assert!(
            !last.is_empty() && last.iter().all(|ok| *ok),
            "the last chunk is marked"
        );
    }
    println!(
        "batch = {batch}: {} messages, {repeats} repeats dropped",
        messages.len()
    );
    delete_queues(&[&queue]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_row_delivers_every_change_once() {
    every_change_once("row").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_transaction_delivers_every_change_once() {
    every_change_once("transaction").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_group_delivers_every_change_once() {
    every_change_once("group").await;
}

/// Run `walrelay consume` with `config` until it exits, which must be with an error (exit
/// code 1); its log.
async fn consume_fails(config: &Path) -> String {
    Relay::start_consume(config).wait_for_failure().await
}

async fn publish(ch: &Channel, queue: &str, id: &str, body: &str) {
    ch.basic_publish(
        "".into(),
        queue.into(),
        BasicPublishOptions::default(),
        body.as_bytes(),
        BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(id.into()),
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

fn transaction(lsn: &str, end: &str, table: &str, id: i64) -> String {
    format!(
        "{{\"kind\":\"begin\",\"lsn\":\"{lsn}\",\"seq\":0,\"xid\":7,\"commit_time\":\"2026-11-21T16:20:00.000000Z\",\"origin\":null}}\n\
         {{\"kind\":\"insert\",\"lsn\":\"{lsn}\",\"seq\":1,\"xid\":7,\"commit_time\":\"2026-11-21T16:20:00.000000Z\",\"schema\":\"public\",\"table\":\"{table}\",\"types\":{{\"id\":\"int4\"}},\"key\":[\"id\"],\"new\":{{\"id\":{id}}}}}\n\
         {{\"kind\":\"commit\",\"lsn\":\"{lsn}\",\"seq\":2,\"xid\":7,\"commit_time\":\"2026-11-21T16:20:00.000000Z\",\"end_lsn\":\"{end}\"}}\n"
    )
}

/// A poison message — not walrelay's format, or for a table the target lacks — is moved to
/// the dead-letter queue with the reason, and the rest is applied; with `on_poison = "stop"`
/// the consumer stops, says why, and leaves the message in the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_are_dead_lettered_or_stop_the_consumer() {
    let pg = TestPg::start();
    let target = pg.create_db("r").await;
    target
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let (queue, dlq) = (unique("poison"), unique("poison-dlq"));
    let (_c, ch) = channel().await;
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions::durable(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    publish(&ch, &queue, "1", &transaction("0/100", "0/130", "t", 1)).await;
    publish(&ch, &queue, "2", "this is not an event").await;
    publish(
        &ch,
        &queue,
        "3",
        &transaction("0/200", "0/230", "missing", 2),
    )
    .await;
    publish(&ch, &queue, "4", &transaction("0/300", "0/330", "t", 3)).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = consume_config(
        dir.path(),
        "dead-letter",
        &queue,
        &pg.url("r"),
        &format!("on_poison = \"dead_letter\"\ndead_letter_queue = \"{dlq}\""),
    );
    let mut consumer = Relay::start_consume(&cfg);
    if tokio::time::timeout(
        Duration::from_secs(60),
        wait_for_count(&target, "SELECT count(*) FROM t", 2, "rows 1 and 3"),
    )
    .await
    .is_err()
    {
        panic!("rows 1 and 3 never arrived:\n{}", consumer.stderr());
    }
    consumer.assert_running();
    let log = consumer.stop().await;
    assert_eq!(
        queue_depth(&queue).await,
        0,
        "every message acknowledged:\n{log}"
    );
    let (poison, _) = drain(&dlq, true, |m| m.len() == 2).await;
    let reasons: Vec<String> = poison
        .iter()
        .map(|(_, h)| match h.get("walrelay-error") {
            Some(AMQPValue::LongString(s)) => s.to_string(),
            other => panic!("walrelay-error: {other:?}"),
        })
        .collect();
    assert!(reasons[0].contains("not JSON"), "{reasons:?}");
    assert!(
        reasons[1].contains("the target has no table") && reasons[1].contains("missing"),
        "{reasons:?}"
    );
    assert_eq!(poison[0].0, b"this is not an event");

    // Applied again from the start: nothing changes (positions recorded in the target).
    publish(&ch, &queue, "1", &transaction("0/100", "0/130", "t", 1)).await;
    publish(&ch, &queue, "5", "still not an event").await;
    let stop_cfg = consume_config(dir.path(), "stop", &queue, &pg.url("r"), "");
    let stderr = consume_fails(&stop_cfg).await;
    assert!(
        stderr.contains("poison message 5") && stderr.contains("not JSON"),
        "{stderr}"
    );
    assert_eq!(
        queue_depth(&queue).await,
        1,
        "the poison message stays in the queue"
    );
    assert_eq!(
        target
            .query_one("SELECT count(*) FROM t", &[])
            .await
            .unwrap()
            .get::<_, i64>(0),
        2,
        "the repeated transaction was not applied twice"
    );

    // A message lost in the middle of a transaction (here: its commit) is a gap: the
    // consumer stops there rather than apply the next transaction over it.
    let gap_queue = unique("gap");
    ch.queue_declare(
        gap_queue.as_str().into(),
        QueueDeclareOptions::durable(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let cut: String = transaction("0/400", "0/430", "t", 4)
        .lines()
        .take(2)
        .map(|l| format!("{l}\n"))
        .collect();
    publish(&ch, &gap_queue, "6", &cut).await;
    publish(&ch, &gap_queue, "7", &transaction("0/500", "0/530", "t", 5)).await;
    let gap_cfg = consume_config(dir.path(), "gap", &gap_queue, &pg.url("r"), "");
    let stderr = consume_fails(&gap_cfg).await;
    assert!(
        stderr.contains("expected the event at 0/400/2 next, got 0/500/0"),
        "{stderr}"
    );
    assert_eq!(
        target
            .query_one("SELECT count(*) FROM t WHERE id IN (4, 5)", &[])
            .await
            .unwrap()
            .get::<_, i64>(0),
        0,
        "nothing of the cut transaction or after it was applied"
    );
    delete_queues(&[&queue, &dlq, &gap_queue]).await;
}

/// Two consumers applying one queue would interleave transactions on one target: the
/// second is refused, and the first goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_consumer_of_a_queue_is_refused() {
    let pg = TestPg::start();
    let target = pg.create_db("r").await;
    target
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let queue = unique("one-consumer");
    let (_c, ch) = channel().await;
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions::durable(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = consume_config(dir.path(), "first", &queue, &pg.url("r"), "");
    let mut first = Relay::start_consume(&cfg);
    wait_for("the first consumer", Duration::from_secs(60), || {
        let consuming = first.stderr().contains("consuming");
        async move { consuming.then_some(()) }
    })
    .await;
    let second = consume_config(dir.path(), "second", &queue, &pg.url("r"), "");
    let stderr = consume_fails(&second).await;
    assert!(
        stderr.contains(&format!("queue {queue} already has a consumer")),
        "{stderr}"
    );
    first.assert_running();
    publish(&ch, &queue, "1", &transaction("0/100", "0/130", "t", 1)).await;
    wait_for_count(
        &target,
        "SELECT count(*) FROM t",
        1,
        "the row, by the first",
    )
    .await;
    first.stop().await;
    delete_queues(&[&queue]).await;
}

/// Every message is published mandatory: one that no queue takes stops the sink, naming
/// the exchange and routing key, instead of being confirmed and lost; with an alternate
/// exchange it goes there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unroutable_message_stops_the_sink_or_goes_to_the_alternate_exchange() {
    let pg = TestPg::start();
    let source = pg.create_db("app").await;
    source.batch_execute(ACCOUNTS).await.unwrap();
    let (exchange, queue) = (unique("unroutable"), unique("unroutable-q"));
    let dir = tempfile::tempdir().unwrap();
    let cfg = relay_config(
        dir.path(),
        &pg.url("app"),
        &["public.acct"],
        &format!(
            "exchange = \"{exchange}\"\nbatch = \"row\"\nqueues = [{{ name = \"{queue}\", binding = \"nothing.matches\" }}]"
        ),
    );
    let stderr = Relay::start(&cfg).wait_for_failure().await;
    assert!(
        stderr.contains(&format!(
            "exchange {exchange:?} with routing key \"snapshot_end\""
        )) && stderr.contains("reached no queue"),
        "{stderr}"
    );

    // The same events, to an exchange with an alternate whose queue takes everything.
    let (exchange2, alternate, caught) = (
        unique("with-alternate"),
        unique("alternate"),
        unique("alternate-q"),
    );
    let (_c, ch) = channel().await;
    ch.exchange_declare(
        alternate.as_str().into(),
        lapin::ExchangeKind::Fanout,
        lapin::options::ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_declare(
        caught.as_str().into(),
        QueueDeclareOptions::durable(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        caught.as_str().into(),
        alternate.as_str().into(),
        "".into(),
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let cfg = relay_config(
        dir.path(),
        &pg.url("app"),
        &["public.acct"],
        &format!(
            "exchange = \"{exchange2}\"\nalternate_exchange = \"{alternate}\"\nbatch = \"row\"\nqueues = [{{ name = \"{queue}\", binding = \"nothing.matches\" }}]"
        ),
    );
    let mut relay = Relay::start(&cfg);
    wait_until_streaming(&source, &mut relay).await;
    source
        .batch_execute("INSERT INTO acct VALUES (1, 10, 'caught')")
        .await
        .unwrap();
    let (messages, _) = drain(&caught, true, |m| {
        m.iter()
            .any(|(body, _)| String::from_utf8_lossy(body).contains("caught"))
    })
    .await;
    assert!(!messages.is_empty());
    relay.stop().await;
    assert_eq!(queue_depth(&queue).await, 0, "the bound queue took nothing");
    delete_queues(&[&queue, &caught]).await;
}

/// The relay dies after publishing and before the broker's confirm; restarted, it
/// publishes the unconfirmed tail again, and the consumer applies every transaction once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_publish_before_confirm_loses_and_repeats_nothing() {
    let (source_pg, target_pg) = (TestPg::start(), TestPg::start());
    let source = source_pg.create_db("app").await;
    source.batch_execute(ACCOUNTS).await.unwrap();
    let replica = target_pg.create_db("r").await;
    replica.batch_execute(ACCOUNTS).await.unwrap();
    let (queue, exchange) = (unique("confirm-q"), unique("confirm"));
    let dir = tempfile::tempdir().unwrap();
    let cfg = relay_config(
        dir.path(),
        &source_pg.url("app"),
        &["public.acct"],
        &format!("exchange = \"{exchange}\"\nqueues = [{{ name = \"{queue}\" }}]"),
    );
    let mut relay = Relay::start(&cfg);
    wait_until_streaming(&source, &mut relay).await;
    relay.kill9().await;
    let stop = Arc::new(AtomicBool::new(false));
    let load = start_load(&source_pg, stop.clone()).await;
    let failpoint = walrelay::failpoint::AMQP_BEFORE_CONFIRM.name();
    let mut armed = Relay::start_with_failpoint("run", &cfg, &format!("{failpoint}:20"));
    armed.wait_for_failpoint(failpoint).await;
    stop.store(true, Ordering::Relaxed);
    let transactions = load.await.unwrap();
    let mut relay = Relay::start(&cfg);
    let consume = consume_config(dir.path(), "c", &queue, &target_pg.url("r"), "");
    let mut consumer = Relay::start_consume(&consume);
    wait_until_equal(&source, &replica, &["acct"], &mut consumer).await;
    relay.assert_running();
    relay.stop().await;
    let log = consumer.stop().await;
    assert!(!log.contains("conflict"), "{log}");
    println!("{transactions} transactions through a crash before a confirm");
    delete_queues(&[&queue]).await;
}

/// Trigger capture through RabbitMQ: a source without logical decoding, an `amqp` sink,
/// `walrelay consume` into a replica; the relay killed once under writes. The replica ends
/// equal to the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trigger_capture_through_amqp_reaches_a_replica() {
    let source = crate::trigger::Source::start().await;
    let (admin, clerk) = (&source.admin, &source.clerk);
    clerk
        .batch_execute(
            "INSERT INTO orders SELECT g, 'copied ' || g, g / 10.0, '2026-01-01'::date + g,
                    '2026-01-01 00:00:00+00'::timestamptz + g * interval '1 hour',
                    ARRAY['a', 'b c'], jsonb_build_object('n', g)
               FROM generate_series(1, 200) g;
             INSERT INTO nokey VALUES (1, 'copied');
             INSERT INTO counter VALUES (1, 0);",
        )
        .await
        .unwrap();
    let replica_pg = TestPg::start();
    let replica = replica_pg.create_db("r").await;
    replica
        .batch_execute(crate::trigger::TABLES_DDL)
        .await
        .unwrap();
    let (queue, exchange) = (unique("trigger-q"), unique("trigger-x"));
    let dir = tempfile::tempdir().unwrap();
    let tables = [
        "public.orders",
        "public.nokey",
        "public.counter",
        "public.load",
    ];
    let cfg = relay_config_file(
        dir.path(),
        &source.owner_url(),
        &tables,
        "capture = \"trigger\"\nstatus_interval = \"200ms\"",
        &format!(
            "[[sink]]\ntype = \"amqp\"\nurl = \"{BROKER}\"\nexchange = \"{exchange}\"\nqueues = [{{ name = \"{queue}\" }}]\n"
        ),
    );
    let consume_cfg = consume_config(dir.path(), "c", &queue, &replica_pg.url("r"), "");
    let mut relay = Relay::start(&cfg);
    // The relay declares the queue when its sink opens.
    wait_for(
        "the relay to declare its queue",
        Duration::from_secs(60),
        || async {
            let (_c, ch) = channel().await;
            ch.queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .ok()
            .map(|_| ())
        },
    )
    .await;
    let mut consumer = Relay::start_consume(&consume_cfg);
    for i in 1..=300 {
        clerk
            .batch_execute(&format!(
                "BEGIN; INSERT INTO load VALUES ({i}, 'row {i}');
                 UPDATE counter SET n = n + 1 WHERE id = 1;
                 UPDATE orders SET id = id + 1000, amount = amount + 1 WHERE id = {i} % 200 + 1;
                 COMMIT;"
            ))
            .await
            .unwrap();
        if i == 150 {
            relay.kill9().await;
            relay = Relay::start(&cfg);
        }
    }
    clerk
        .batch_execute("UPDATE nokey SET b = 'changed'; INSERT INTO nokey VALUES (2, NULL); DELETE FROM orders WHERE id > 1100")
        .await
        .unwrap();
    let all = ["orders", "nokey", "counter", "load"];
    wait_until_equal(admin, &replica, &all, &mut consumer).await;
    relay.assert_running();
    relay.stop().await;
    consumer.stop().await;
    delete_queues(&[&queue]).await;
}

//! A relay through failovers: on an HA cluster the agents keep the primary's logical slot
//! on every replica, and a relay given every node's address follows the primary, losing
//! nothing and applying nothing twice; a transaction reaches a target only once the
//! synchronous standby has it.

use std::time::{Duration, Instant};

use serde_json::Value as J;
use walrelay_testkit::TestPg;

use crate::ha::{
    assert_all_in, assert_all_present, create_table_and_wait_on_replicas, must_connect, Cluster,
    Writer, PASSWORD,
};
use crate::support::{checksum, postgres_config, wait_for_count, wait_until_equal, Relay};

/// Every member but the leader says its copy of slot `walrelay` is ready.
async fn wait_for_ready_copies(cluster: &Cluster, leader: &str) {
    cluster
        .wait(
            "every replica's copy of slot walrelay to be ready",
            Duration::from_secs(120),
            || async {
                let c = cluster.cluster_json().await;
                let members = c["members"].as_array()?.clone();
                let replicas: Vec<&J> = members.iter().filter(|m| m["name"] != leader).collect();
                let ready = replicas.len() == cluster.nodes.len() - 1
                    && replicas.iter().all(|m| {
                        m["slot_copies"].as_array().is_some_and(|copies| {
                            copies
                                .iter()
                                .any(|s| s["name"] == "walrelay" && s["ready"] == true)
                        })
                    });
                ready.then_some(())
            },
        )
        .await;
}

/// The slots on `port`: (name, type).
async fn slots_on(port: u16) -> Vec<(String, String)> {
    must_connect(port)
        .await
        .query(
            "SELECT slot_name::text, slot_type FROM pg_replication_slots ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_follows_the_primary_through_two_failovers_and_a_switchover() {
    let mut cluster = Cluster::start(3, "synchronous_mode = true");
    let mut leader = cluster.wait_for_leader(None, "a bootstrapped leader").await;
    create_table_and_wait_on_replicas(&cluster, &leader).await;

    let target = TestPg::start();
    let target_db = target.create_db("app").await;
    let dir = tempfile::tempdir().unwrap();
    let hosts: Vec<String> = cluster
        .ports()
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect();
    let source_url = format!(
        "postgresql://postgres:{PASSWORD}@{}/postgres?sslmode=disable&target_session_attrs=read-write",
        hosts.join(",")
    );
    let cfg = postgres_config(
        dir.path(),
        &source_url,
        &target.url("app"),
        &["public.w"],
        "",
    );
    let mut relay = Relay::start(&cfg);
    wait_for_count(
        &target_db,
        "SELECT count(*) FROM w WHERE id = 0",
        1,
        "the first row on the target",
    )
    .await;
    wait_for_ready_copies(&cluster, &leader).await;
    let listing = cluster.ctl(&leader, &["list"]);
    assert!(listing.contains("walrelay ready"), "{listing}");

    // Two failovers in a row: the second promotes a node whose copy was made from the
    // first new primary's slot (itself a copy).
    for round in 1..=2 {
        let writer = Writer::start(cluster.ports());
        writer.wait_for_more(100, "writes on the primary").await;
        cluster.kill9(&leader).await;
        let killed_at = Instant::now();
        let new_leader = cluster.wait_for_leader(Some(&leader), "a new leader").await;
        writer.wait_for_more(50, "writes on the new primary").await;
        let acked = writer.finish().await;
        assert_all_present(cluster.node(&new_leader).port, &acked).await;
        let primary = must_connect(cluster.node(&new_leader).port).await;
        wait_until_equal(&primary, &target_db, &["w"], &mut relay).await;
        assert_all_in(&target_db, &acked).await;
        println!(
            "failover {round}: {leader} -> {new_leader}; target equal to the new primary {:?} after the kill, {} acknowledged writes",
            killed_at.elapsed(),
            acked.len()
        );
        // The old primary rejoins; its own slots are gone, it gets a copy of the new one's.
        cluster.start_agent(&leader);
        cluster.wait_streaming(&leader).await;
        leader = new_leader;
        wait_for_ready_copies(&cluster, &leader).await;
    }

    let writer = Writer::start(cluster.ports());
    writer
        .wait_for_more(100, "writes before the switchover")
        .await;
    cluster.ctl(&leader, &["switchover"]);
    let new_leader = cluster
        .wait_for_leader(Some(&leader), "the switchover's candidate to lead")
        .await;
    writer
        .wait_for_more(50, "writes after the switchover")
        .await;
    let acked = writer.finish().await;
    let primary = must_connect(cluster.node(&new_leader).port).await;
    wait_until_equal(&primary, &target_db, &["w"], &mut relay).await;
    assert_all_in(&target_db, &acked).await;
    cluster.wait_streaming(&leader).await;
    leader = new_leader;
    wait_for_ready_copies(&cluster, &leader).await;

    // No slot holds WAL for anyone gone: the leader has one physical slot per other member
    // and the relay's; each replica has its copy of the relay's slot and nothing else.
    for n in &cluster.nodes {
        let slots = slots_on(n.port).await;
        let mut expected: Vec<(String, String)> = vec![("walrelay".into(), "logical".into())];
        if n.name == leader {
            expected.extend(
                cluster
                    .nodes
                    .iter()
                    .filter(|m| m.name != leader)
                    .map(|m| (m.name.clone(), "physical".to_string())),
            );
            expected.sort();
        }
        assert_eq!(slots, expected, "slots on {}", n.name);
    }
    let log = relay.stderr();
    assert!(
        !log.contains("slot walrelay does not exist"),
        "the relay never had to wait for a slot: every promoted node had its copy\n{log}"
    );
    println!("target rows: {:?}", checksum(&target_db, "w").await);
}

/// A relay from table `t` (one row) of a fresh source to a fresh target, streaming.
struct GateScene {
    source: TestPg,
    _target: TestPg,
    db: tokio_postgres::Client,
    target_db: tokio_postgres::Client,
    _dir: tempfile::TempDir,
    relay: Relay,
}

impl GateScene {
    async fn start(extra_source: &str) -> GateScene {
        let source = TestPg::start();
        let target = TestPg::start();
        let db = source.create_db("app").await;
        db.batch_execute("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (0)")
            .await
            .unwrap();
        let target_db = target.create_db("app").await;
        let dir = tempfile::tempdir().unwrap();
        let sink = format!(
            "[[sink]]\ntype = \"postgres\"\nurl = \"{}\"\n",
            target.url("app")
        );
        let cfg = crate::support::relay_config_file(
            dir.path(),
            &source.url("app"),
            &["public.t"],
            extra_source,
            &sink,
        );
        let mut relay = Relay::start(&cfg);
        crate::support::wait_until_streaming(&db, &mut relay).await;
        wait_for_count(&target_db, "SELECT count(*) FROM t", 1, "the copy").await;
        GateScene {
            source,
            _target: target,
            db,
            target_db,
            _dir: dir,
            relay,
        }
    }

    async fn set_standbys(&self, names: &str) {
        self.db
            .batch_execute(&format!(
                "ALTER SYSTEM SET synchronous_standby_names = '{names}'"
            ))
            .await
            .unwrap();
        self.db
            .batch_execute("SELECT pg_reload_conf()")
            .await
            .unwrap();
    }

    /// `INSERT INTO t VALUES (id)` in a task of its own, once its commit waits for a
    /// standby (committed on the primary, invisible until then) and has been sent to the
    /// relay (the walsender of no application named in `standbys`).
    async fn insert_waiting_for_standbys(
        &self,
        id: i32,
        standbys: &str,
    ) -> tokio::task::JoinHandle<Result<u64, tokio_postgres::Error>> {
        let writer = self.source.client("app").await;
        let insert = walrelay::task::spawn_named("waiting-insert", async move {
            writer.execute("INSERT INTO t VALUES ($1)", &[&id]).await
        });
        wait_for_count(
            &self.db,
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'",
            1,
            "the commit to wait for the standby",
        )
        .await;
        let flushed: String = self
            .db
            .query_one("SELECT pg_current_wal_flush_lsn()::text", &[])
            .await
            .unwrap()
            .get(0);
        let sent = format!(
            "SELECT coalesce(bool_or(sent_lsn >= $1::text::pg_lsn), false) FROM pg_stat_replication \
             WHERE application_name <> ALL (string_to_array('{standbys}', ','))"
        );
        walrelay_testkit::wait_for(
            "the commit sent to the relay",
            Duration::from_secs(60),
            || async {
                let row = self.db.query_one(&sent, &[&flushed]).await.ok()?;
                row.get::<_, bool>(0).then_some(())
            },
        )
        .await;
        insert
    }

    /// Row `id` is not on the target 2 s after its commit reached the relay, while the
    /// commit still waits.
    async fn assert_held(&self, id: i32, insert: &tokio::task::JoinHandle<impl Sized>) {
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(
            !insert.is_finished(),
            "the commit should still wait for the standby"
        );
        let n: i64 = self
            .target_db
            .query_one("SELECT count(*) FROM t WHERE id = $1", &[&id])
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            n,
            0,
            "held back until the standby has it:\n{}",
            self.relay.stderr()
        );
    }

    async fn wait_on_target(&self, id: i32, what: &str) {
        wait_for_count(
            &self.target_db,
            &format!("SELECT count(*) FROM t WHERE id = {id}"),
            1,
            what,
        )
        .await;
    }
}

/// A commit that waits for a synchronous standby that has not confirmed it is committed on
/// the primary and decoded, but a failover would lose it: the relay holds it back until the
/// standby has it (here: until no standby is asked for). With the gate off, the same commit
/// reaches the target while its client still waits — the case the gate exists for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_reaches_the_target_only_once_the_synchronous_standby_has_it() {
    for gate in [true, false] {
        let scene = GateScene::start(&format!("wait_for_sync_standby = {gate}")).await;
        scene.set_standbys("nobody").await;
        // While no standby is named the gate looks again only every 100 ms (a standby just
        // named cannot be promoted before it has caught up; see standby_gate.rs).
        tokio::time::sleep(Duration::from_millis(500)).await;
        let insert = scene.insert_waiting_for_standbys(1, "").await;
        if gate {
            scene.assert_held(1, &insert).await;
        } else {
            scene
                .wait_on_target(1, "the ungated commit on the target")
                .await;
            assert!(
                !insert.is_finished(),
                "the commit should still wait for the standby"
            );
        }
        scene.set_standbys("").await;
        insert.await.unwrap().unwrap();
        scene.wait_on_target(1, "the row once released").await;
        scene.relay.stop().await;
    }
}

/// `synchronous_standby_names = '*'` names the relay's own connection too: the commit waits
/// for the relay, and the relay for the standbys (itself). It cannot end by itself, so the
/// relay says so, naming the setting; once the setting names no one, the row arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_named_as_its_own_synchronous_standby_says_so() {
    let scene = GateScene::start("").await;
    scene.set_standbys("*").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let insert = scene.insert_waiting_for_standbys(1, "").await;
    walrelay_testkit::wait_for(
        "the relay to say the setting names it",
        Duration::from_secs(60),
        || {
            let said = scene
                .relay
                .stderr()
                .contains("synchronous_standby_names names this relay's own connection");
            async move { said.then_some(()) }
        },
    )
    .await;
    scene.set_standbys("").await;
    insert.await.unwrap().unwrap();
    scene
        .wait_on_target(1, "the row once no standby is named")
        .await;
    scene.relay.stop().await;
}

/// `pg_receivewal --synchronous` under an application name: a real walsender client that
/// flushes and confirms every record at once, standing in for a synchronous standby;
/// killed when dropped (then its WAL directory goes).
struct FakeStandby {
    child: std::process::Child,
    _wal: tempfile::TempDir,
}

impl FakeStandby {
    fn start(source: &TestPg, name: &str) -> FakeStandby {
        let dir = tempfile::tempdir().unwrap();
        let bin = walrelay::pg::local::find_bindir().unwrap();
        let url = format!("{}&application_name={name}", source.url("postgres"));
        let child = std::process::Command::new(bin.join("pg_receivewal"))
            .args(["--synchronous", "--no-loop", "--no-password", "-D"])
            .arg(dir.path())
            .args(["-d", &url])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("starting pg_receivewal");
        FakeStandby { child, _wal: dir }
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), signal).unwrap();
    }
}

impl Drop for FakeStandby {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Quorum commit (`ANY n (…)`, as CloudNativePG and Patroni's quorum mode set it): every
/// standby shows `quorum`, none `sync`, and PostgreSQL releases a commit once n of them
/// have it. The relay does the same: with ANY 1 a commit reaches the target while one
/// standby is frozen; with ANY 2 it waits for the frozen one as the commit does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_quorum_commit_a_transaction_reaches_the_target_once_enough_standbys_have_it() {
    use nix::sys::signal::Signal;
    let scene = GateScene::start("").await;
    let _s1 = FakeStandby::start(&scene.source, "s1");
    let s2 = FakeStandby::start(&scene.source, "s2");
    scene.set_standbys("ANY 1 (s1, s2)").await;
    wait_for_count(
        &scene.db,
        "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'quorum'",
        2,
        "both standbys in the quorum",
    )
    .await;
    scene
        .db
        .execute("INSERT INTO t VALUES (1)", &[])
        .await
        .unwrap();
    scene.wait_on_target(1, "a commit the quorum has").await;

    // One standby frozen: one of two still makes ANY 1.
    s2.signal(Signal::SIGSTOP);
    scene
        .db
        .execute("INSERT INTO t VALUES (2)", &[])
        .await
        .unwrap();
    scene
        .wait_on_target(2, "a commit one of two standbys has, under ANY 1")
        .await;

    // ANY 2 with one frozen: the commit waits, and so does the relay. (The walsenders
    // take the new setting on their next loop: a commit made before would be released
    // by s1 alone.)
    scene.set_standbys("ANY 2 (s1, s2)").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let insert = scene.insert_waiting_for_standbys(3, "s1,s2").await;
    scene.assert_held(3, &insert).await;
    s2.signal(Signal::SIGCONT);
    insert.await.unwrap().unwrap();
    scene
        .wait_on_target(3, "the row once both standbys have it")
        .await;
    scene.relay.stop().await;
}

/// A slot gone from the source while the target holds what came through it (a failover to
/// a node without its copy, a slot dropped by hand): a new slot would start now and skip
/// what was committed in between, so the relay makes none and says so. Emptying the
/// target's walrelay schema and tables is the way to start over, with a full copy.
#[tokio::test]
async fn a_lost_slot_is_not_made_anew_while_the_target_holds_what_came_through_it() {
    let source = TestPg::start();
    let target = TestPg::start();
    let db = source.create_db("app").await;
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    let target_db = target.create_db("app").await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = postgres_config(
        dir.path(),
        &source.url("app"),
        &target.url("app"),
        &["public.t"],
        "",
    );
    let mut relay = Relay::start(&cfg);
    crate::support::wait_until_streaming(&db, &mut relay).await;
    db.execute("INSERT INTO t VALUES (2)", &[]).await.unwrap();
    wait_for_count(&target_db, "SELECT count(*) FROM t", 2, "the streamed row").await;
    relay.stop().await;

    db.batch_execute("SELECT pg_drop_replication_slot('walrelay'); INSERT INTO t VALUES (3)")
        .await
        .unwrap();
    let mut relay = Relay::start(&cfg);
    let log = relay.wait_for_failure().await;
    assert!(
        log.contains("slot walrelay does not exist") && log.contains("none is created"),
        "{log}"
    );
    let slots: i64 = db
        .query_one("SELECT count(*) FROM pg_replication_slots", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0, "no slot was made");

    // The way back the message gives: the tables, walrelay's schema, the origin.
    assert!(log.contains("pg_replication_origin_drop"), "{log}");
    target_db
        .batch_execute(
            "DROP TABLE t; DROP SCHEMA walrelay CASCADE;
             SELECT pg_replication_origin_drop(roname) FROM pg_replication_origin
              WHERE roname = 'walrelay/postgres'",
        )
        .await
        .unwrap();
    let mut relay = Relay::start(&cfg);
    crate::support::wait_until_streaming(&db, &mut relay).await;
    wait_for_count(
        &target_db,
        "SELECT count(*) FROM t",
        3,
        "every row, copied again",
    )
    .await;
    relay.stop().await;
}

/// A member that leaves for good (agent and server killed, never restarted) loses its
/// physical slot on the primary once it has been gone `drop_slots_of_departed_after`, so no
/// WAL is kept for it; the other member's slot and a slot of another tool's stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_slot_of_a_member_gone_for_good_is_dropped_and_others_stay() {
    let mut cluster = Cluster::start(3, "drop_slots_of_departed_after = \"3s\"");
    let leader = cluster.wait_for_leader(None, "a bootstrapped leader").await;
    create_table_and_wait_on_replicas(&cluster, &leader).await;
    let port = cluster.node(&leader).port;
    must_connect(port)
        .await
        .batch_execute("SELECT pg_create_physical_replication_slot('backup_tool')")
        .await
        .unwrap();
    let replicas: Vec<String> = cluster
        .nodes
        .iter()
        .filter(|n| n.name != leader)
        .map(|n| n.name.clone())
        .collect();
    let (gone, stays) = (replicas[0].clone(), replicas[1].clone());
    cluster.kill9(&gone).await;
    cluster
        .wait(
            &format!("{gone}'s slot to be dropped"),
            Duration::from_secs(120),
            || async {
                let slots = slots_on(port).await;
                (!slots.iter().any(|(name, _)| *name == gone)).then_some(())
            },
        )
        .await;
    let slots = slots_on(port).await;
    for kept in ["backup_tool", stays.as_str()] {
        assert!(
            slots.contains(&(kept.to_string(), "physical".to_string())),
            "{kept} kept: {slots:?}"
        );
    }
}

/// `slot_wal_limit` with `drop_slots_over_limit`: a logical slot no one reads, holding more
/// WAL than the limit, is dropped with an error in the log. The members' slots stay: the
/// one in use, and the one of a replica killed before the WAL grew, idle and over the limit
/// too, which keeps the WAL its replica needs (a slot made anew would start past it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unused_slot_over_the_wal_limit_is_dropped_loudly() {
    let mut cluster = Cluster::start(3, "slot_wal_limit = 4194304\ndrop_slots_over_limit = true");
    let leader = cluster.wait_for_leader(None, "a bootstrapped leader").await;
    create_table_and_wait_on_replicas(&cluster, &leader).await;
    let port = cluster.node(&leader).port;
    let primary = must_connect(port).await;
    let down = cluster
        .nodes
        .iter()
        .find(|n| n.name != leader)
        .unwrap()
        .name
        .clone();
    cluster.kill9(&down).await;
    let restart_lsn_of_down = || async {
        must_connect(port)
            .await
            .query_opt(
                "SELECT restart_lsn::text FROM pg_replication_slots WHERE slot_name = $1 AND NOT active",
                &[&down],
            )
            .await
            .unwrap()
            .map(|r| r.get::<_, String>(0))
    };
    let held_for_down = cluster
        .wait(
            "the killed replica's slot to be idle",
            Duration::from_secs(60),
            restart_lsn_of_down,
        )
        .await;
    primary
        .batch_execute("SELECT pg_create_logical_replication_slot('forgotten', 'pgoutput')")
        .await
        .unwrap();
    // More than 4 MB of WAL behind it.
    primary
        .batch_execute("INSERT INTO w(id) SELECT g FROM generate_series(1, 100000) g")
        .await
        .unwrap();
    cluster
        .wait(
            "the forgotten slot to be dropped",
            Duration::from_secs(120),
            || async {
                let slots = slots_on(port).await;
                (!slots.iter().any(|(name, _)| name == "forgotten")).then_some(())
            },
        )
        .await;
    let log = cluster.agent_log(&leader);
    assert!(
        log.contains("dropping a slot that holds more WAL"),
        "{}",
        cluster.dump_logs()
    );
    let slots = slots_on(port).await;
    for n in cluster.nodes.iter().filter(|n| n.name != leader) {
        assert!(
            slots.contains(&(n.name.clone(), "physical".to_string())),
            "{slots:?}"
        );
    }
    // Not dropped and made anew: it still holds the WAL from where its replica stopped.
    assert_eq!(
        restart_lsn_of_down().await,
        Some(held_for_down),
        "{}",
        cluster.dump_logs()
    );
}

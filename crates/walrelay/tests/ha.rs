//! High availability with a real etcd and three local PostgreSQL nodes, each agent its own
//! `walrelay ha` process: bootstrap, failover under writes (through HAProxy), rejoin with
//! pg_rewind, synchronous mode, switchover, and a primary that loses etcd.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value as J;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use walrelay::pg::local::{LocalServer, LocalServerOptions, StopMode};
use walrelay_testkit::{free_port, scratch_dir, wait_for, TestEtcd};

use crate::support::{Relay, BIN};

const PASSWORD: &str = "walrelay";

struct HaNode {
    name: String,
    base_dir: PathBuf,
    config: PathBuf,
    port: u16,
    api_port: u16,
    agent: Option<Relay>,
}

struct Cluster {
    etcd: TestEtcd,
    nodes: Vec<HaNode>,
}

impl Cluster {
    /// `n` nodes, their agents all started at once: one wins the bootstrap.
    fn start(n: usize, extra_cluster: &str) -> Cluster {
        let etcd = TestEtcd::start();
        let cluster_name = format!("c{}", etcd.client_port);
        let nodes = (1..=n)
            .map(|i| {
                let base_dir = scratch_dir();
                let port = free_port();
                let api_port = free_port();
                let name = format!("n{i}");
                let config = etcd.dir.join(format!("{name}.toml"));
                std::fs::write(
                    &config,
                    format!(
                        "[node]\nname = \"{name}\"\nbase_dir = \"{}\"\nport = {port}\napi = \"127.0.0.1:{api_port}\"\n\n\
                         [cluster]\nname = \"{cluster_name}\"\netcd = [\"{}\"]\n{extra_cluster}\n\n\
                         [postgres]\nsettings = {{ fsync = \"off\" }}\n",
                        base_dir.display(),
                        etcd.url()
                    ),
                )
                .unwrap();
                HaNode {
                    name,
                    base_dir,
                    config,
                    port,
                    api_port,
                    agent: None,
                }
            })
            .collect();
        let mut cluster = Cluster { etcd, nodes };
        for i in 0..n {
            cluster.start_agent(&format!("n{}", i + 1));
        }
        cluster
    }

    fn node(&self, name: &str) -> &HaNode {
        self.nodes.iter().find(|n| n.name == name).unwrap()
    }

    fn node_mut(&mut self, name: &str) -> &mut HaNode {
        self.nodes.iter_mut().find(|n| n.name == name).unwrap()
    }

    fn start_agent(&mut self, name: &str) {
        let node = self.node_mut(name);
        let agent = Relay::spawn("ha", &node.config, std::process::Stdio::null());
        // Recorded so that the test kit kills it if this test process dies.
        std::fs::write(node.base_dir.join("agent.pid"), agent.pid().to_string()).unwrap();
        node.agent = Some(agent);
    }

    fn agent_log(&self, name: &str) -> String {
        self.node(name)
            .agent
            .as_ref()
            .map(|a| a.stderr())
            .unwrap_or_default()
    }

    fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// kill -9 of the node's agent and of its PostgreSQL: the postmaster and every backend
    /// (a backend whose postmaster died can still commit a write or two).
    async fn kill9(&mut self, name: &str) {
        let node = self.node_mut(name);
        let agent = node.agent.take().expect("agent running");
        agent.kill9().await;
        let pid = walrelay::pg::local::postmaster_pid(&node.base_dir.join("data"))
            .expect("the killed node's postmaster.pid");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGSTOP,
        )
        .unwrap();
        let children = std::process::Command::new("pkill")
            .args(["-9", "-P", &pid.to_string()])
            .status()
            .unwrap();
        assert!(children.success(), "the postmaster had backends to kill");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
    }

    /// The member whose `/primary` answers 200 (other than `not`).
    async fn wait_for_leader(&self, not: Option<&str>, what: &str) -> String {
        wait_for(what, Duration::from_secs(120), || async {
            for n in &self.nodes {
                if Some(n.name.as_str()) != not && http(n.api_port, "/primary").await?.0 == 200 {
                    return Some(n.name.clone());
                }
            }
            None
        })
        .await
    }

    async fn wait_streaming(&self, name: &str) {
        let port = self.node(name).api_port;
        wait_for(
            &format!("{name} to stream from the leader"),
            Duration::from_secs(120),
            || async { (http(port, "/replica").await?.0 == 200).then_some(()) },
        )
        .await;
    }

    /// `/cluster` from the first agent that answers.
    async fn cluster_json(&self) -> J {
        for n in self.nodes.iter().filter(|n| n.agent.is_some()) {
            if let Some((_, body)) = http(n.api_port, "/cluster").await {
                return serde_json::from_str(&body).unwrap();
            }
        }
        panic!("no agent answered /cluster");
    }

    fn dump_logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| {
                format!(
                    "--- {} agent:\n{}",
                    n.name,
                    walrelay::pg::local::last_lines(&self.agent_log(&n.name), 40)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            drop(node.agent.take());
            if let Ok(server) =
                LocalServer::open(LocalServerOptions::new(&node.base_dir, node.port))
            {
                let _ = server.stop(StopMode::Immediate);
            }
            let _ = std::fs::remove_dir_all(&node.base_dir);
        }
    }
}

/// One HTTP/1.0 request to an agent's API: the status and the body.
async fn http(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((status, body))
}

async fn connect(port: u16) -> Option<tokio_postgres::Client> {
    let url = format!(
        "postgresql://postgres:{PASSWORD}@127.0.0.1:{port}/postgres?sslmode=disable&connect_timeout=2"
    );
    let info = walrelay::pg::conninfo::resolve(&url, &walrelay::pg::conninfo::ProcessEnv).unwrap();
    walrelay::pg::sql::connect(&info).await.ok()
}

async fn must_connect(port: u16) -> tokio_postgres::Client {
    connect(port)
        .await
        .unwrap_or_else(|| panic!("connecting to port {port}"))
}

/// A client inserting a new id every 10 ms into whichever of `ports` takes writes,
/// recording each acknowledged id and when.
struct Writer {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<(i64, Instant)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    fn start(ports: Vec<u16>) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let (s, a) = (stop.clone(), acked.clone());
        let task = walrelay::task::spawn_named("writer", async move {
            let mut id = 0i64;
            let mut at = 0usize;
            let mut client: Option<tokio_postgres::Client> = None;
            while !s.load(Ordering::Relaxed) {
                if client.is_none() {
                    client = connect(ports[at % ports.len()]).await;
                }
                if let Some(c) = &client {
                    // A fresh id every attempt: a failed one may still have committed.
                    id += 1;
                    match c.execute("INSERT INTO w(id) VALUES ($1)", &[&id]).await {
                        Ok(_) => a.lock().unwrap().push((id, Instant::now())),
                        Err(_) => {
                            client = None;
                            at += 1;
                        }
                    }
                } else {
                    at += 1;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        Writer { stop, acked, task }
    }

    fn count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    async fn wait_for_more(&self, more: usize, what: &str) {
        let target = self.count() + more;
        wait_for(what, Duration::from_secs(120), || async {
            (self.count() >= target).then_some(())
        })
        .await;
    }

    async fn finish(self) -> Vec<(i64, Instant)> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        Arc::try_unwrap(self.acked).unwrap().into_inner().unwrap()
    }
}

/// Every acknowledged id is on the server at `port`.
async fn assert_all_present(port: u16, acked: &[(i64, Instant)]) {
    let client = must_connect(port).await;
    let ids: Vec<i64> = acked.iter().map(|(id, _)| *id).collect();
    let missing: Vec<i64> = client
        .query(
            "SELECT a FROM unnest($1::bigint[]) a WHERE NOT EXISTS (SELECT 1 FROM w WHERE id = a)",
            &[&ids],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged writes are missing: {:?}",
        missing.len(),
        ids.len(),
        &missing[..missing.len().min(20)]
    );
}

/// The longest time between two consecutive acknowledged writes.
fn longest_pause(acked: &[(i64, Instant)]) -> Duration {
    acked
        .windows(2)
        .map(|w| w[1].1 - w[0].1)
        .max()
        .unwrap_or_default()
}

async fn create_table_and_wait_on_replicas(cluster: &Cluster, leader: &str) {
    let client = must_connect(cluster.node(leader).port).await;
    client
        .batch_execute("CREATE TABLE w (id bigint PRIMARY KEY, at timestamptz DEFAULT now()); INSERT INTO w(id) VALUES (0)")
        .await
        .unwrap();
    for n in cluster.nodes.iter().filter(|n| n.name != leader) {
        cluster.wait_streaming(&n.name).await;
        let replica = must_connect(n.port).await;
        wait_for(
            &format!("the first row on replica {}", n.name),
            Duration::from_secs(60),
            || async {
                let r = replica
                    .query_opt("SELECT 1 FROM w WHERE id = 0", &[])
                    .await
                    .ok()?;
                r.map(|_| ())
            },
        )
        .await;
    }
}

/// HAProxy in front of the nodes, sending connections to the one whose `/primary`
/// answers 200.
struct HaProxy {
    port: u16,
    child: std::process::Child,
}

impl HaProxy {
    fn start(cluster: &Cluster) -> HaProxy {
        let port = free_port();
        let mut cfg = format!(
            "global\n  maxconn 100\ndefaults\n  mode tcp\n  timeout connect 1s\n  timeout client 60s\n  timeout server 60s\n\
             listen primary\n  bind 127.0.0.1:{port}\n  option httpchk GET /primary\n  http-check expect status 200\n\
             \x20 default-server inter 500ms fall 2 rise 1 on-marked-down shutdown-sessions\n"
        );
        for n in &cluster.nodes {
            cfg.push_str(&format!(
                "  server {} 127.0.0.1:{} check port {}\n",
                n.name, n.port, n.api_port
            ));
        }
        let path = cluster.etcd.dir.join("haproxy.cfg");
        std::fs::write(&path, cfg).unwrap();
        let child = std::process::Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("starting haproxy: install Debian's haproxy (.ci/run does)");
        std::fs::write(cluster.etcd.dir.join("haproxy.pid"), child.id().to_string()).unwrap();
        HaProxy { port, child }
    }
}

impl Drop for HaProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_then_failover_through_haproxy_and_the_old_primary_rejoins_with_pg_rewind() {
    let mut cluster = Cluster::start(3, "");
    let leader = cluster.wait_for_leader(None, "a bootstrapped leader").await;
    create_table_and_wait_on_replicas(&cluster, &leader).await;
    let list = std::process::Command::new(BIN)
        .args(["ctl", "--config"])
        .arg(&cluster.node(&leader).config)
        .arg("list")
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&list.stdout).into_owned();
    println!("{list}");
    assert_eq!(list.matches("streaming").count(), 2, "{list}");
    assert!(list.contains("leader"), "{list}");

    let haproxy = HaProxy::start(&cluster);
    let writer = Writer::start(vec![haproxy.port]);
    writer.wait_for_more(50, "writes through HAProxy").await;

    cluster.kill9(&leader).await;
    let killed = Instant::now();
    let before = writer.count();
    let new_leader = cluster
        .wait_for_leader(Some(&leader), "a replica to be promoted")
        .await;
    writer
        .wait_for_more(50, "writes through HAProxy to resume on the new primary")
        .await;
    let acked = writer.finish().await;
    let first_after = acked[before].1;
    println!(
        "failover: {leader} killed, {new_leader} promoted; first write through HAProxy {:.1} s after the kill",
        (first_after - killed).as_secs_f64()
    );
    // The writes after the failover went to the new primary.
    let new_primary = must_connect(cluster.node(&new_leader).port).await;
    let last = acked.last().unwrap().0;
    assert!(
        new_primary
            .query_opt("SELECT 1 FROM w WHERE id = $1", &[&last])
            .await
            .unwrap()
            .is_some(),
        "the last write through HAProxy is on {new_leader}"
    );
    let timeline: J = cluster.cluster_json().await;
    assert_eq!(
        timeline["leader"],
        J::from(new_leader.clone()),
        "{timeline}"
    );

    // The old primary's agent comes back: pg_rewind, then a replica of the new leader.
    cluster.start_agent(&leader);
    cluster.wait_streaming(&leader).await;
    let log = cluster.agent_log(&leader);
    assert!(log.contains("rewinding"), "{}", cluster.dump_logs());
    let old = must_connect(cluster.node(&leader).port).await;
    wait_for(
        "the last write on the rejoined node",
        Duration::from_secs(60),
        || async {
            old.query_opt("SELECT 1 FROM w WHERE id = $1", &[&last])
                .await
                .ok()?
                .map(|_| ())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_synchronous_mode_a_failover_loses_no_acknowledged_commit() {
    let mut cluster = Cluster::start(3, "synchronous_mode = true");
    let leader = cluster.wait_for_leader(None, "a bootstrapped leader").await;
    create_table_and_wait_on_replicas(&cluster, &leader).await;
    let standby = wait_for(
        "a synchronous standby to be named",
        Duration::from_secs(60),
        || async {
            let c = cluster.cluster_json().await;
            c["sync"]["standby"].as_str().map(str::to_string)
        },
    )
    .await;
    let writer = Writer::start(cluster.ports());
    writer.wait_for_more(100, "writes on the primary").await;
    cluster.kill9(&leader).await;
    let new_leader = cluster
        .wait_for_leader(Some(&leader), "the synchronous standby to be promoted")
        .await;
    assert_eq!(
        new_leader, standby,
        "only the synchronous standby may be promoted"
    );
    writer.wait_for_more(50, "writes on the new primary").await;
    let acked = writer.finish().await;
    assert_all_present(cluster.node(&new_leader).port, &acked).await;
    println!(
        "synchronous mode: {} acknowledged writes, all on {new_leader}",
        acked.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchover_under_writes_pauses_briefly_and_loses_nothing() {
    let mut cluster = Cluster::start(3, "");
    let leader = cluster.wait_for_leader(None, "a bootstrapped leader").await;
    create_table_and_wait_on_replicas(&cluster, &leader).await;
    let writer = Writer::start(cluster.ports());
    writer.wait_for_more(100, "writes on the primary").await;
    let out = tokio::process::Command::new(BIN)
        .args(["ctl", "--config"])
        .arg(&cluster.node(&leader).config)
        .arg("switchover")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "ctl switchover: {stdout}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        cluster.dump_logs()
    );
    let new_leader = cluster
        .wait_for_leader(Some(&leader), "the candidate to lead")
        .await;
    writer.wait_for_more(100, "writes on the new primary").await;
    let acked = writer.finish().await;
    assert_all_present(cluster.node(&new_leader).port, &acked).await;
    println!(
        "{stdout}switchover {leader} -> {new_leader}: longest pause between acknowledged writes {} ms, {} writes, none lost",
        longest_pause(&acked).as_millis(),
        acked.len()
    );
    // The old primary follows the new one.
    cluster.wait_streaming(&leader).await;

    // The leader's agent alone crashes and restarts: it adopts the lease its key is bound
    // to, and keeps leading under the same generation (no failover).
    let generation = cluster.cluster_json().await["generation"].clone();
    let agent = cluster.node_mut(&new_leader).agent.take().unwrap();
    agent.kill9().await;
    cluster.start_agent(&new_leader);
    wait_for(
        "the restarted agent to adopt its lease",
        Duration::from_secs(60),
        || async {
            cluster
                .agent_log(&new_leader)
                .contains("adopting")
                .then_some(())
        },
    )
    .await;
    // What must not happen is the old lease expiring under it: wait past that moment.
    tokio::time::sleep(cluster_ttl()).await;
    assert_eq!(
        cluster.wait_for_leader(None, "the same leader").await,
        new_leader,
        "{}",
        cluster.dump_logs()
    );
    assert_eq!(cluster.cluster_json().await["generation"], generation);
}

/// The default lease ttl, which the tests do not change.
fn cluster_ttl() -> Duration {
    Duration::from_secs(8)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_etcd_the_primary_stops_taking_writes_and_the_cluster_recovers() {
    let mut cluster = Cluster::start(2, "");
    let leader = cluster.wait_for_leader(None, "a bootstrapped leader").await;
    create_table_and_wait_on_replicas(&cluster, &leader).await;
    let port = cluster.node(&leader).port;
    let client = must_connect(port).await;
    client
        .execute("INSERT INTO w(id) VALUES (1)", &[])
        .await
        .unwrap();

    cluster.etcd.stop();
    let stopped = Instant::now();
    wait_for(
        "the primary to stop taking writes",
        Duration::from_secs(60),
        || async {
            match connect(port).await {
                None => Some(()),
                Some(c) => c
                    .execute("INSERT INTO w(id) SELECT max(id) + 1 FROM w", &[])
                    .await
                    .is_err()
                    .then_some(()),
            }
        },
    )
    .await;
    println!(
        "etcd stopped: the primary refused writes {:.1} s later (ttl 8 s)",
        stopped.elapsed().as_secs_f64()
    );
    // The loop demotes, or the watchdog fences first: either stopped the server.
    let log = cluster.agent_log(&leader);
    assert!(
        log.contains("demoting") || log.contains("fencing"),
        "{}",
        cluster.dump_logs()
    );
    assert!(
        http(cluster.node(&leader).api_port, "/primary")
            .await
            .unwrap()
            .0
            != 200,
        "/primary must not answer 200 without a lease"
    );

    cluster.etcd.resume();
    let back = cluster
        .wait_for_leader(None, "a leader once etcd is back")
        .await;
    let client = must_connect(cluster.node(&back).port).await;
    wait_for(
        "a write to succeed again",
        Duration::from_secs(60),
        || async {
            client
                .execute("INSERT INTO w(id) VALUES (3) ON CONFLICT DO NOTHING", &[])
                .await
                .ok()
                .map(|_| ())
        },
    )
    .await;
    let other = cluster
        .nodes
        .iter()
        .find(|n| n.name != back)
        .unwrap()
        .name
        .clone();
    cluster.wait_streaming(&other).await;
}

#[tokio::test]
async fn a_taken_api_port_and_an_unreachable_etcd_are_clear_errors() {
    let dir = scratch_dir();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let api = taken.local_addr().unwrap();
    let config = dir.join("node.toml");
    std::fs::write(
        &config,
        format!(
            "[node]\nname = \"n1\"\nbase_dir = \"{}\"\nport = {}\napi = \"{api}\"\n\
             [cluster]\nname = \"c\"\netcd = [\"http://127.0.0.1:{}\"]\n",
            dir.join("n1").display(),
            free_port(),
            free_port()
        ),
    )
    .unwrap();
    let ha = tokio::process::Command::new(BIN)
        .args(["ha", "--config"])
        .arg(&config)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&ha.stderr);
    assert!(!ha.status.success());
    assert!(
        stderr.contains(&format!("the REST API cannot listen on {api}")),
        "{stderr}"
    );
    assert!(!dir.join("n1/data").exists(), "nothing was created");

    let ctl = tokio::process::Command::new(BIN)
        .args(["ctl", "--config"])
        .arg(&config)
        .arg("list")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&ctl.stderr);
    assert!(!ctl.status.success());
    assert!(
        stderr.contains("walrelay: error: reading the cluster from etcd"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

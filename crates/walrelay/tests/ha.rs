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

// Not the defaults: every agent must use the configured passwords, wherever it connects
// (cloning, rewinding, streaming). The replication password holds what a passfile and a
// conninfo string must escape.
pub(crate) const PASSWORD: &str = "Sup3r-Secret";
const REPLICATION_PASSWORD: &str = "Rep:l1 ca'tor\\";
/// `POST /switchover` (and so `ctl switchover`) needs it.
const API_TOKEN: &str = "t0ken-for-switchover";

pub(crate) struct HaNode {
    pub(crate) name: String,
    base_dir: PathBuf,
    pub(crate) config: PathBuf,
    pub(crate) port: u16,
    api_port: u16,
    agent: Option<Relay>,
}

pub(crate) struct Cluster {
    etcd: TestEtcd,
    pub(crate) nodes: Vec<HaNode>,
    /// The REST APIs speak HTTPS, with certificates this trusts.
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Cluster {
    /// `n` nodes, their agents all started at once: one wins the bootstrap.
    pub(crate) fn start(n: usize, extra_cluster: &str) -> Cluster {
        Self::start_with(n, extra_cluster, |_| (String::new(), None))
    }

    /// As `start`, with `api(dir)` giving more `[api]` keys (given a directory for files)
    /// and, for HTTPS, what the tests' requests trust.
    fn start_with(
        n: usize,
        extra_cluster: &str,
        api: impl FnOnce(&std::path::Path) -> (String, Option<Arc<rustls::ClientConfig>>),
    ) -> Cluster {
        let etcd = TestEtcd::start();
        let (extra_api, tls) = api(&etcd.dir);
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
                         [postgres]\nsuperuser_password = {}\nreplication_password = {}\n\
                         settings = {{ fsync = \"off\", log_statement = \"ddl\" }}\n\n[api]\ntoken = {}\n{extra_api}\n",
                        base_dir.display(),
                        etcd.url(),
                        toml_string(PASSWORD),
                        toml_string(REPLICATION_PASSWORD),
                        toml_string(API_TOKEN),
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
        let mut cluster = Cluster { etcd, nodes, tls };
        for i in 0..n {
            cluster.start_agent(&format!("n{}", i + 1));
        }
        cluster
    }

    pub(crate) fn node(&self, name: &str) -> &HaNode {
        self.nodes.iter().find(|n| n.name == name).unwrap()
    }

    fn node_mut(&mut self, name: &str) -> &mut HaNode {
        self.nodes.iter_mut().find(|n| n.name == name).unwrap()
    }

    pub(crate) fn start_agent(&mut self, name: &str) {
        self.start_agent_with_env(name, &[]);
    }

    /// Start the agent with extra environment variables, as from an operator's shell.
    fn start_agent_with_env(&mut self, name: &str, env: &[(&str, &str)]) {
        let node = self.node_mut(name);
        let stderr_path = node.config.with_extension(format!(
            "stderr.{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let child = std::process::Command::new(BIN)
            .args(["ha", "--config"])
            .arg(&node.config)
            .env(
                "RUST_LOG",
                std::env::var("TEST_RUST_LOG").unwrap_or("walrelay=debug".into()),
            )
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .spawn()
            .expect("starting walrelay ha");
        let agent = Relay { child, stderr_path };
        // Recorded so that the test kit kills it if this test process dies.
        std::fs::write(node.base_dir.join("agent.pid"), agent.pid().to_string()).unwrap();
        node.agent = Some(agent);
    }

    pub(crate) fn agent_log(&self, name: &str) -> String {
        self.node(name)
            .agent
            .as_ref()
            .map(|a| a.stderr())
            .unwrap_or_default()
    }

    pub(crate) fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// kill -9 of the node's agent, its fence and its PostgreSQL: the postmaster and every
    /// backend (a backend whose postmaster died can still commit a write or two), as a
    /// machine that crashes. The postmaster is stopped first, so that the fence, which
    /// would shut it down once the agent is gone, cannot get to it first.
    pub(crate) async fn kill9(&mut self, name: &str) {
        use nix::sys::signal::{kill, Signal};
        use nix::unistd::Pid;
        let node = self.node_mut(name);
        let agent = node.agent.take().expect("agent running");
        let pid = walrelay::pg::local::postmaster_pid(&node.base_dir.join("data"))
            .expect("the killed node's postmaster.pid");
        kill(Pid::from_raw(pid), Signal::SIGSTOP).unwrap();
        let fences = fence_pids(agent.pid());
        agent.kill9().await;
        for fence in fences {
            let _ = kill(Pid::from_raw(fence), Signal::SIGKILL);
        }
        let children = std::process::Command::new("pkill")
            .args(["-9", "-P", &pid.to_string()])
            .status()
            .unwrap();
        assert!(children.success(), "the postmaster had backends to kill");
        kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    }

    /// The member whose `/primary` answers 200 (other than `not`).
    pub(crate) async fn wait_for_leader(&self, not: Option<&str>, what: &str) -> String {
        wait_for(what, Duration::from_secs(120), || async {
            for n in &self.nodes {
                if Some(n.name.as_str()) != not && self.get(n.api_port, "/primary").await?.0 == 200
                {
                    return Some(n.name.clone());
                }
            }
            None
        })
        .await
    }

    pub(crate) async fn wait_streaming(&self, name: &str) {
        let port = self.node(name).api_port;
        wait_for(
            &format!("{name} to stream from the leader"),
            Duration::from_secs(120),
            || async { (self.get(port, "/replica").await?.0 == 200).then_some(()) },
        )
        .await;
    }

    /// `/cluster` from the first agent that answers.
    pub(crate) async fn cluster_json(&self) -> J {
        for n in self.nodes.iter().filter(|n| n.agent.is_some()) {
            if let Some((_, body)) = self.get(n.api_port, "/cluster").await {
                return serde_json::from_str(&body).unwrap();
            }
        }
        panic!("no agent answered /cluster");
    }

    /// `GET path` on an agent's API, over HTTPS if the cluster's APIs speak it.
    async fn get(&self, port: u16, path: &str) -> Option<(u16, String)> {
        request(port, self.tls.as_ref(), "GET", path, &[], "").await
    }

    pub(crate) fn dump_logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| {
                let server_log =
                    std::fs::read_to_string(n.base_dir.join("server.log")).unwrap_or_default();
                format!(
                    "--- {} agent:\n{}\n--- {} PostgreSQL:\n{}",
                    n.name,
                    walrelay::pg::local::last_lines(&self.agent_log(&n.name), 40),
                    n.name,
                    walrelay::pg::local::last_lines(&server_log, 15)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// `walrelay ctl --config <node's file> ARGS`, which must succeed: its output.
    pub(crate) fn ctl(&self, node: &str, args: &[&str]) -> String {
        let out = std::process::Command::new(BIN)
            .args(["ctl", "--config"])
            .arg(&self.node(node).config)
            .args(args)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "ctl {args:?}: {stdout}{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.dump_logs()
        );
        stdout
    }

    /// `wait_for`, with every node's logs in the failure.
    pub(crate) async fn wait<T, F, Fut>(&self, what: &str, timeout: Duration, mut condition: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let polled = async {
            loop {
                if let Some(v) = condition().await {
                    return v;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        match tokio::time::timeout(timeout, polled).await {
            Ok(v) => v,
            Err(_) => panic!(
                "timed out after {timeout:?} waiting for {what}\n{}",
                self.dump_logs()
            ),
        }
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

/// The fence processes (`walrelay ha-fence`) the agent `agent` started.
fn fence_pids(agent: i32) -> Vec<i32> {
    let out = std::process::Command::new("pgrep")
        .args(["-P", &agent.to_string(), "-f", "ha-fence"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// A TOML basic string holding `s`.
fn toml_string(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// One HTTP/1.0 GET to an agent's API: the status and the body.
async fn http(port: u16, path: &str) -> Option<(u16, String)> {
    request(port, None, "GET", path, &[], "").await
}

/// One HTTP/1.0 request to an agent's API, over TLS with `tls`: the status and the body.
async fn request(
    port: u16,
    tls: Option<&Arc<rustls::ClientConfig>>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Option<(u16, String)> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let mut text = format!(
        "{method} {path} HTTP/1.0\r\nHost: localhost\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        text.push_str(&format!("{name}: {value}\r\n"));
    }
    text.push_str("\r\n");
    text.push_str(body);
    let answer = match tls {
        None => exchange(tcp, &text).await?,
        Some(config) => {
            let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
            let stream = tokio_rustls::TlsConnector::from(config.clone())
                .connect(name, tcp)
                .await
                .ok()?;
            exchange(stream, &text).await?
        }
    };
    let status = answer.split_whitespace().nth(1)?.parse().ok()?;
    let body = answer.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((status, body))
}

async fn exchange(
    mut s: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    request: &str,
) -> Option<String> {
    s.write_all(request.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .ok()?;
    // A TLS peer that closes without close_notify has still said all it had to.
    if read.is_err() && buf.is_empty() {
        return None;
    }
    Some(String::from_utf8_lossy(&buf).into_owned())
}

async fn connect(port: u16) -> Option<tokio_postgres::Client> {
    let url = format!(
        "postgresql://postgres:{PASSWORD}@127.0.0.1:{port}/postgres?sslmode=disable&connect_timeout=2"
    );
    let info = walrelay::pg::conninfo::resolve(&url, &walrelay::pg::conninfo::ProcessEnv).unwrap();
    walrelay::pg::sql::connect(&info).await.ok()
}

pub(crate) async fn must_connect(port: u16) -> tokio_postgres::Client {
    connect(port)
        .await
        .unwrap_or_else(|| panic!("connecting to port {port}"))
}

/// A client inserting a new id every 10 ms into whichever of `ports` takes writes,
/// recording each acknowledged id and when.
pub(crate) struct Writer {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<(i64, Instant)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    pub(crate) fn start(ports: Vec<u16>) -> Writer {
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

    pub(crate) async fn wait_for_more(&self, more: usize, what: &str) {
        let target = self.count() + more;
        wait_for(what, Duration::from_secs(120), || async {
            (self.count() >= target).then_some(())
        })
        .await;
    }

    pub(crate) async fn finish(self) -> Vec<(i64, Instant)> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        Arc::try_unwrap(self.acked).unwrap().into_inner().unwrap()
    }
}

/// Every acknowledged id is on the server at `port`.
pub(crate) async fn assert_all_present(port: u16, acked: &[(i64, Instant)]) {
    assert_all_in(&must_connect(port).await, acked).await
}

/// Every acknowledged id is in table `w` of `client`'s database.
pub(crate) async fn assert_all_in(client: &tokio_postgres::Client, acked: &[(i64, Instant)]) {
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

pub(crate) async fn create_table_and_wait_on_replicas(cluster: &Cluster, leader: &str) {
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
    // A member key written by another walrelay version (a rolling upgrade): skipped by
    // every reader, not fatal to any.
    let foreign = format!("/walrelay/c{}/members/zz", cluster.etcd.client_port);
    walrelay::ha::etcd::Etcd::new(&[cluster.etcd.url()], Duration::from_secs(3))
        .unwrap()
        .put(&foreign, br#"{"format":2}"#, None)
        .await
        .unwrap();
    create_table_and_wait_on_replicas(&cluster, &leader).await;
    // The DBA logs DDL (`log_statement = ddl` above): the replication role's creation is
    // in the log, its password is not.
    let server_log =
        std::fs::read_to_string(cluster.node(&leader).base_dir.join("server.log")).unwrap();
    assert!(server_log.contains("CREATE ROLE"), "{server_log}");
    assert!(!server_log.contains("Rep:l1"), "{server_log}");
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
    // The leader reads the key at its next loop (the replicas may be streaming before).
    cluster
        .wait(
            "the leader to skip the foreign key",
            Duration::from_secs(30),
            || async {
                cluster
                    .agent_log(&leader)
                    .contains("skipping a key that does not decode")
                    .then_some(())
            },
        )
        .await;

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

/// The reported case: synchronous mode, kill -9 of the leader's agent and PostgreSQL under
/// writes, a new leader takes over, and the old node's agent, restarted, must stream
/// again — on a new lease (its old one is gone), through a slot the new primary makes for
/// it, with the configured passwords.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill_9_of_the_leader_the_restarted_old_node_streams_from_the_new_one() {
    let mut cluster = Cluster::start(3, "synchronous_mode = true");
    let leader = cluster.wait_for_leader(None, "a bootstrapped leader").await;
    create_table_and_wait_on_replicas(&cluster, &leader).await;
    wait_for(
        "a synchronous standby to be named",
        Duration::from_secs(60),
        || async {
            cluster.cluster_json().await["sync"]["standby"]
                .as_str()
                .map(|_| ())
        },
    )
    .await;
    let writer = Writer::start(cluster.ports());
    writer.wait_for_more(100, "writes on the primary").await;
    cluster.kill9(&leader).await;
    let new_leader = cluster.wait_for_leader(Some(&leader), "a new leader").await;
    writer.wait_for_more(50, "writes on the new primary").await;

    // Restarted from an operator's shell that holds the superuser's password for psql: it
    // must not stand in for the replication password when the rejoined node connects.
    cluster.start_agent_with_env(&leader, &[("PGPASSWORD", PASSWORD)]);
    let primary = must_connect(cluster.node(&new_leader).port).await;
    cluster
        .wait(
        &format!("{leader} in pg_stat_replication on {new_leader}"),
        Duration::from_secs(120),
        || async {
            primary
                .query_opt(
                    "SELECT 1 FROM pg_stat_replication WHERE application_name = $1 AND state = 'streaming'",
                    &[&leader],
                )
                .await
                .ok()?
                .map(|_| ())
        },
    )
    .await;
    cluster.wait_streaming(&leader).await;
    cluster
        .wait(
            &format!("{leader}'s member key to say streaming"),
            Duration::from_secs(60),
            || async {
                let c = cluster.cluster_json().await;
                let members = c["members"].as_array()?.clone();
                members
                    .iter()
                    .any(|m| m["name"] == leader.as_str() && m["state"] == "streaming")
                    .then_some(())
            },
        )
        .await;
    let acked = writer.finish().await;
    assert_all_present(cluster.node(&new_leader).port, &acked).await;
    // A row written after the rejoin reaches the rejoined node.
    primary
        .execute("INSERT INTO w(id) VALUES (-1)", &[])
        .await
        .unwrap();
    let old = must_connect(cluster.node(&leader).port).await;
    cluster
        .wait(
            "the row written after the rejoin on the rejoined node",
            Duration::from_secs(60),
            || async {
                old.query_opt("SELECT 1 FROM w WHERE id = -1", &[])
                    .await
                    .ok()?
                    .map(|_| ())
            },
        )
        .await;
    let log = cluster.agent_log(&leader);
    assert!(
        !log.contains("lease not found") && !log.contains("password authentication failed"),
        "{}",
        cluster.dump_logs()
    );
}

/// One write straight to the server at `port` (no HAProxy), on `client` (connected again
/// if it is gone): true if it committed.
async fn write_directly(client: &mut Option<tokio_postgres::Client>, port: u16, id: i64) -> bool {
    if client.as_ref().is_none_or(|c| c.is_closed()) {
        *client = connect(port).await;
    }
    let Some(c) = client else {
        return false;
    };
    match c.execute("INSERT INTO w(id) VALUES ($1)", &[&id]).await {
        Ok(_) => true,
        Err(_) => {
            *client = None;
            false
        }
    }
}

/// The reported case: kill -9 of the primary's agent alone, its PostgreSQL left running
/// and written to directly. The fence stops that server while the leader key is still the
/// old primary's — so before any other node can be promoted, which takes that key first —
/// and from then on no write reaches it, through the promotion of another node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_whose_agent_is_killed_takes_no_write_once_another_node_may_lead() {
    use walrelay::ha::etcd::Etcd;
    let mut cluster = Cluster::start(3, "");
    let leader = cluster.wait_for_leader(None, "a bootstrapped leader").await;
    create_table_and_wait_on_replicas(&cluster, &leader).await;
    let port = cluster.node(&leader).port;
    let etcd = Etcd::new(&[cluster.etcd.url()], Duration::from_secs(3)).unwrap();
    let leader_key = format!("/walrelay/c{}/leader", cluster.etcd.client_port);
    let key_now = || async {
        etcd.range(&leader_key, false)
            .await
            .unwrap()
            .first()
            .map(|kv| {
                (
                    String::from_utf8_lossy(&kv.value).into_owned(),
                    kv.create_revision,
                )
            })
    };
    let before = key_now().await.expect("the leader key");
    assert_eq!(before.0, leader);

    let mut client = None;
    let mut id = 1000i64;
    for _ in 0..20 {
        id += 1;
        assert!(
            write_directly(&mut client, port, id).await,
            "writes before the kill"
        );
    }
    let agent = cluster.node_mut(&leader).agent.take().unwrap();
    let log_path = agent.stderr_path.clone();
    agent.kill9().await;

    // Writes go on, straight to the old primary, until it refuses one. At that moment
    // the old leader key must still be there, as it was: no one can have been promoted.
    let key_at_refusal = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            id += 1;
            if !write_directly(&mut client, port, id).await {
                return key_now().await;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "the old primary still takes writes a minute after its agent died\n{}",
            cluster.dump_logs()
        )
    });
    assert_eq!(
        key_at_refusal,
        Some(before.clone()),
        "the old primary refused writes only after its leader key had gone\n{}",
        cluster.dump_logs()
    );
    // From then on, through the promotion of another node, no write commits there.
    let new_leader = tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            id += 1;
            assert!(
                !write_directly(&mut client, port, id).await,
                "write {id} committed on the fenced old primary"
            );
            for n in cluster.nodes.iter().filter(|n| n.name != leader) {
                if http(n.api_port, "/primary")
                    .await
                    .is_some_and(|(s, _)| s == 200)
                {
                    return n.name.clone();
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no new leader\n{}", cluster.dump_logs()));
    let after = key_now().await.expect("the new leader key");
    assert_eq!(after.0, new_leader);
    assert!(
        after.1 > before.1,
        "a new generation: {before:?} then {after:?}"
    );
    for _ in 0..10 {
        id += 1;
        assert!(
            !write_directly(&mut client, port, id).await,
            "write {id} committed on the old primary after {new_leader} was promoted"
        );
    }
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        log.contains("fencing") && log.contains("the agent is gone"),
        "{log}"
    );
    println!("{leader}'s agent killed: its server refused writes while it still held generation {}; {new_leader} leads at generation {}", before.1, after.1);

    // The fenced node comes back as a replica of the new leader.
    cluster.start_agent(&leader);
    cluster.wait_streaming(&leader).await;
}

/// The fence process alone, with a stand-in for the postmaster: disarmed it exits with
/// its agent and leaves the server be; armed, it fences at its deadline, or at once when
/// the agent is gone; SIGTERM and SIGINT, meant for the agent, do not stop it.
#[tokio::test]
async fn the_fence_fires_at_its_deadline_or_when_its_agent_goes_and_outlives_sigterm() {
    use std::io::Write;
    use std::os::unix::process::ExitStatusExt;
    let dir = scratch_dir();
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let postmaster = || {
        let child = std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .unwrap();
        std::fs::write(data.join("postmaster.pid"), format!("{}\n", child.id())).unwrap();
        child
    };
    // Started, and ready once it says so (its signal handlers are in place by then).
    let fence = || {
        let mut f = std::process::Command::new(BIN)
            .args(["ha-fence", "--data-dir"])
            .arg(&data)
            .env("RUST_LOG", "walrelay=debug")
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = std::io::BufReader::new(f.stderr.take().unwrap());
        let mut lines = std::io::BufRead::lines(stderr);
        assert!(
            lines.any(|l| l.unwrap().contains("fence: watching")),
            "the fence never said it was ready"
        );
        // Keep reading, so that its logging never blocks.
        std::thread::spawn(move || lines.for_each(drop));
        f
    };
    let fenced = |mut server: std::process::Child, what: &str| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = server.try_wait().unwrap() {
                assert_eq!(status.signal(), Some(nix::libc::SIGQUIT), "{what}");
                return;
            }
            assert!(Instant::now() < deadline, "not fenced: {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };

    // Disarmed: the agent goes, the server stays.
    let mut server = postmaster();
    let mut f = fence();
    f.stdin
        .as_mut()
        .unwrap()
        .write_all(b"arm 60000\ndisarm\n")
        .unwrap();
    drop(f.stdin.take());
    assert!(f.wait().unwrap().success());
    assert!(
        server.try_wait().unwrap().is_none(),
        "a disarmed fence left the server"
    );
    server.kill().unwrap();
    server.wait().unwrap();

    // Armed: at the deadline, even though the agent is still there (frozen, say) — and
    // after SIGTERM and SIGINT.
    let server = postmaster();
    let mut f = fence();
    let mut stdin = f.stdin.take().unwrap();
    stdin.write_all(b"arm 600000\n").unwrap();
    for signal in [
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGINT,
    ] {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(f.id() as i32), signal).unwrap();
    }
    stdin.write_all(b"arm 100\n").unwrap();
    fenced(server, "at the deadline");
    assert!(
        f.try_wait().unwrap().is_none(),
        "the fence outlives SIGTERM"
    );
    drop(stdin);
    assert!(f.wait().unwrap().success());

    // Armed, and the agent goes: at once, however long the lease had left.
    let server = postmaster();
    let mut f = fence();
    f.stdin
        .as_mut()
        .unwrap()
        .write_all(b"arm 600000\n")
        .unwrap();
    drop(f.stdin.take());
    fenced(server, "when the agent went");
    assert!(f.wait().unwrap().success());
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchover_under_writes_pauses_briefly_and_loses_nothing() {
    let mut cluster = Cluster::start(3, "");
    let leader = cluster.wait_for_leader(None, "a bootstrapped leader").await;
    create_table_and_wait_on_replicas(&cluster, &leader).await;
    let writer = Writer::start(cluster.ports());
    writer.wait_for_more(100, "writes on the primary").await;
    // Blocking: the writer runs on the runtime's other thread meanwhile.
    let stdout = cluster.ctl(&leader, &["switchover"]);
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

    // The leader's agent alone crashes and restarts: its fence stops PostgreSQL when it
    // dies; the new agent adopts the lease its key is bound to, starts the server again as
    // the primary, and keeps leading under the same generation (no failover).
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

/// `POST /switchover` to the API on `port`, with `Authorization: <auth>` if given.
async fn post_switchover(
    port: u16,
    tls: Option<&Arc<rustls::ClientConfig>>,
    auth: Option<&str>,
) -> (u16, String) {
    let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
    request(port, tls, "POST", "/switchover", &headers, "{}")
        .await
        .expect("an answer to POST /switchover")
}

/// The REST API over HTTPS, with a token: the checks answer anyone (HAProxy does not
/// authenticate), `POST /switchover` without the token or with a wrong one is refused
/// (401) and changes nothing, with it is accepted (202) and done; `ctl switchover` sends
/// the token over HTTPS, checking the agent's certificate against `api.cafile`, and
/// without a token it refuses to ask.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_serves_https_and_takes_a_switchover_only_with_its_token() {
    use rustls::pki_types::pem::PemObject;
    let cluster = Cluster::start_with(2, "", |dir| {
        let certs = walrelay_testkit::make_certs(dir, "IP:127.0.0.1");
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::CertificateDer::pem_file_iter(&certs.ca).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let api = format!(
            "certfile = {}\nkeyfile = {}\ncafile = {}\n",
            toml_string(&certs.cert.display().to_string()),
            toml_string(&certs.key.display().to_string()),
            toml_string(&certs.ca.display().to_string()),
        );
        (api, Some(Arc::new(client)))
    });
    // Over HTTPS (`get` speaks it for this cluster).
    let leader = cluster.wait_for_leader(None, "a bootstrapped leader").await;
    let other = cluster
        .nodes
        .iter()
        .find(|n| n.name != leader)
        .unwrap()
        .name
        .clone();
    cluster.wait_streaming(&other).await;
    let port = cluster.node(&leader).api_port;
    let (status, body) = cluster
        .get(port, "/health")
        .await
        .expect("/health over HTTPS");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"is_leader\":true"), "{body}");
    assert!(
        http(port, "/health").await.is_none_or(|(s, _)| s != 200),
        "plain HTTP on the HTTPS port"
    );

    let tls = cluster.tls.clone();
    for auth in [None, Some("Bearer wrong"), Some(API_TOKEN)] {
        let (status, body) = post_switchover(port, tls.as_ref(), auth).await;
        assert_eq!(status, 401, "{auth:?}: {body}");
    }
    assert!(
        cluster.cluster_json().await["switchover"].is_null(),
        "a refused request asked for nothing"
    );
    let bearer = format!("Bearer {API_TOKEN}");
    let (status, body) = post_switchover(port, tls.as_ref(), Some(&bearer)).await;
    assert_eq!(status, 202, "{body}");
    let new_leader = cluster
        .wait_for_leader(Some(&leader), "the other node to lead after the switchover")
        .await;
    assert_eq!(new_leader, other);

    // ctl, with a file that has no token, does not ask...
    cluster.wait_streaming(&leader).await;
    let config = std::fs::read_to_string(&cluster.node(&leader).config).unwrap();
    let no_token: String = config
        .lines()
        .filter(|l| !l.starts_with("token ="))
        .map(|l| format!("{l}\n"))
        .collect();
    let ctl_config = cluster.etcd.dir.join("ctl-no-token.toml");
    std::fs::write(&ctl_config, no_token).unwrap();
    let ctl = |config: PathBuf| async move {
        tokio::process::Command::new(BIN)
            .args(["ctl", "--config"])
            .arg(config)
            .arg("switchover")
            .output()
            .await
            .unwrap()
    };
    let out = ctl(ctl_config).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("api.token is not set"), "{stderr}");
    // ...with the node's file, it sends the token over HTTPS and the role goes back.
    let out = ctl(cluster.node(&leader).config.clone()).await;
    assert!(
        out.status.success(),
        "ctl switchover: {}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        cluster.dump_logs()
    );
    assert_eq!(
        cluster
            .wait_for_leader(Some(&new_leader), "the first node to lead again")
            .await,
        leader
    );
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

/// A node whose file leaves a password at the documented default does not bootstrap a
/// new cluster: it exits naming the keys to set, having created nothing — no data
/// directory, no `initialize` key.
#[tokio::test]
async fn a_new_cluster_is_not_bootstrapped_with_the_default_passwords() {
    let etcd = TestEtcd::start();
    let raw = walrelay::ha::etcd::Etcd::new(&[etcd.url()], Duration::from_secs(3)).unwrap();
    for (postgres, named, not_named) in [
        (
            "",
            "postgres.superuser_password and postgres.replication_password",
            None,
        ),
        (
            "[postgres]\nsuperuser_password = \"s3t\"\n",
            "postgres.replication_password",
            Some("postgres.superuser_password"),
        ),
    ] {
        let base_dir = etcd.dir.join("n1");
        let config = etcd.dir.join("n1.toml");
        std::fs::write(
            &config,
            format!(
                "[node]\nname = \"n1\"\nbase_dir = \"{}\"\nport = {}\napi = \"127.0.0.1:{}\"\n\
                 [cluster]\nname = \"c\"\netcd = [\"{}\"]\n{postgres}",
                base_dir.display(),
                free_port(),
                free_port(),
                etcd.url()
            ),
        )
        .unwrap();
        let ha = tokio::time::timeout(
            Duration::from_secs(60),
            tokio::process::Command::new(BIN)
                .args(["ha", "--config"])
                .arg(&config)
                .output(),
        )
        .await
        .expect("the agent exits")
        .unwrap();
        let stderr = String::from_utf8_lossy(&ha.stderr);
        assert!(!ha.status.success(), "{stderr}");
        assert!(
            stderr.contains(&format!(
                "walrelay: error: refusing to bootstrap a new cluster with the documented default password: set {named}"
            )),
            "{stderr}"
        );
        if let Some(key) = not_named {
            assert!(!stderr.contains(&format!("set {key}")), "{stderr}");
        }
        assert!(!base_dir.join("data").exists(), "no data directory");
        assert!(
            raw.range("/walrelay/c/initialize", false)
                .await
                .unwrap()
                .is_empty(),
            "initialize not claimed"
        );
        assert!(
            raw.range("/walrelay/c/members/", true)
                .await
                .unwrap()
                .is_empty(),
            "no member key left behind"
        );
    }
}

fn cluster_section(etcd: &TestEtcd, name: &str) -> walrelay::config::ha::ClusterSection {
    walrelay::config::ha::ClusterSection {
        name: name.into(),
        namespace: "walrelay".into(),
        etcd: vec![etcd.url()],
        ttl: cluster_ttl(),
        loop_wait: Duration::from_secs(1),
        retry_timeout: Duration::from_secs(3),
        maximum_lag_on_failover: 1 << 20,
        synchronous_mode: false,
        use_pg_rewind: true,
        logical_slots: vec!["walrelay*".into()],
        drop_slots_of_departed_after: Duration::from_secs(1800),
        slot_wal_limit: None,
        drop_slots_over_limit: false,
    }
}

/// The store against a real etcd, without PostgreSQL: a lease that vanished is replaced,
/// the leader's writes need the key at the generation read, and a member key from another
/// walrelay version is skipped.
#[tokio::test]
async fn the_store_replaces_a_lost_lease_fences_stale_leaders_and_skips_foreign_members() {
    use walrelay::ha::decide::LeaderKey;
    use walrelay::ha::etcd::Etcd;
    use walrelay::ha::store::{MemberInfo, Store, StoreError, SyncState};

    let etcd = TestEtcd::start();
    let section = cluster_section(&etcd, "c");
    let raw = Etcd::new(&section.etcd, Duration::from_secs(3)).unwrap();
    let mut a = Store::new(&section).await.unwrap();
    let mut b = Store::new(&section).await.unwrap();
    let member = |name: &str| MemberInfo {
        name: name.into(),
        api: "127.0.0.1:1".into(),
        api_tls: false,
        host: "127.0.0.1".into(),
        port: 1,
        role: "replica".into(),
        state: "streaming".into(),
        timeline: 1,
        received: Default::default(),
        replayed: Default::default(),
        nofailover: false,
        not_promotable: None,
        slot_copies: Vec::new(),
    };

    // A lease that is gone (here revoked behind the agent's back, as when it expired
    // while the agent was down) is replaced, and the member key goes out on the new one.
    let first = a.renew().await.unwrap();
    raw.lease_revoke(first).await.unwrap();
    let second = a.renew().await.unwrap();
    assert_ne!(first, second);
    a.put_member(&member("n1")).await.unwrap();
    b.renew().await.unwrap();
    b.put_member(&member("n2")).await.unwrap();

    // a leads at generation g1; b's writes as leader are refused.
    assert!(a.take_leader("n1").await.unwrap());
    let view = a.read().await.unwrap();
    let g1 = view.leader.clone().unwrap();
    assert_eq!(g1.holder, "n1");
    let sync = |leader: &str| SyncState {
        leader: leader.into(),
        standby: None,
    };
    a.put_sync(&g1, &sync("n1")).await.unwrap();
    let forged = LeaderKey {
        holder: "n2".into(),
        generation: g1.generation,
    };
    assert!(matches!(
        b.put_sync(&forged, &sync("n2")).await,
        Err(StoreError::NotLeader { .. })
    ));

    // a loses its lease; b takes the key; a, deposed, cannot write as leader any more —
    // nor after it takes a new lease and the key again under the same name: the
    // generation it read is gone.
    a.revoke().await;
    assert!(b.take_leader("n2").await.unwrap());
    let g2 = b.read().await.unwrap().leader.unwrap();
    for result in [
        a.put_sync(&g1, &sync("n1")).await,
        a.clear_switchover(&g1).await,
    ] {
        assert!(
            matches!(result, Err(StoreError::NotLeader { .. })),
            "{result:?}"
        );
    }
    b.put_sync(&g2, &sync("n2")).await.unwrap();
    assert!(b.release_leader("n2").await.unwrap());
    a.renew().await.unwrap();
    a.put_member(&member("n1")).await.unwrap();
    assert!(a.take_leader("n1").await.unwrap());
    let g3 = a.read().await.unwrap().leader.unwrap();
    assert_ne!(g3.generation, g1.generation);
    assert!(matches!(
        a.put_sync(&g1, &sync("n1")).await,
        Err(StoreError::NotLeader { .. })
    ));
    a.put_sync(&g3, &sync("n1")).await.unwrap();
    // A switchover asked of a leader that changed since is refused, not queued.
    assert!(matches!(
        b.request_switchover(&g2, None).await,
        Err(StoreError::NotLeader { .. })
    ));
    assert!(b.request_switchover(&g3, None).await.unwrap());
    assert!(!b.request_switchover(&g3, None).await.unwrap());

    // Another version's member key: skipped, the read succeeds.
    raw.put(
        "/walrelay/c/members/n9",
        br#"{"format":2,"member":{"name":"n9"}}"#,
        None,
    )
    .await
    .unwrap();
    let view = b.read().await.unwrap();
    let names: Vec<&str> = view.members.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["n1", "n2"]);
    assert_eq!(view.sync, Some(sync("n1")));
}

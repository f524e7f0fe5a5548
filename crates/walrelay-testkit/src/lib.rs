//! Test harness: real, throwaway PostgreSQL servers on free loopback ports, and waiting on
//! conditions instead of sleeping.
//!
//! Each server lives in `/tmp/walrelay-test/<pid>-<n>` and is stopped and removed when its
//! handle drops. Directories left by a test process that died (kill -9, a crash) are removed
//! at the next start, once their process is gone.

use std::fs;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};

use walrelay::pg::local::{LocalServer, LocalServerOptions, StopMode};

pub use walrelay::pg::local::LocalServerError;

const ROOT: &str = "/tmp/walrelay-test";

/// A PostgreSQL 15 server for one test.
pub struct TestPg {
    pub server: LocalServer,
}

/// Settings for a test server beyond the defaults (wal_level=logical, slots and senders).
#[derive(Default, Clone)]
pub struct TestPgBuilder {
    settings: Vec<(String, String)>,
}

impl TestPgBuilder {
    pub fn setting(mut self, name: &str, value: impl ToString) -> Self {
        self.settings.push((name.to_string(), value.to_string()));
        self
    }

    /// initdb and start, retrying on another port if the chosen one was taken meanwhile.
    pub fn start(self) -> TestPg {
        clean_leftovers();
        let mut last_error = None;
        for _ in 0..5 {
            let dir = next_dir();
            let mut options = LocalServerOptions::new(&dir, free_port());
            // Tests do not need durability against OS crashes; a killed process still
            // leaves its writes in the page cache.
            options.settings.push(("fsync".into(), "off".into()));
            options.settings.extend(self.settings.iter().cloned());
            let server = match LocalServer::init(options) {
                Ok(s) => s,
                Err(e) => panic!("initdb for a test server failed: {e}"),
            };
            match server.start() {
                Ok(()) => return TestPg { server },
                Err(e) => {
                    let _ = fs::remove_dir_all(&dir);
                    last_error = Some(e);
                }
            }
        }
        panic!(
            "could not start a test server: {}",
            last_error.map(|e| e.to_string()).unwrap_or_default()
        );
    }
}

impl TestPg {
    pub fn builder() -> TestPgBuilder {
        TestPgBuilder::default()
    }

    /// A server with the default test settings.
    pub fn start() -> TestPg {
        Self::builder().start()
    }

    pub fn port(&self) -> u16 {
        self.server.port()
    }

    /// Superuser URL for `dbname` (password authentication over TCP).
    pub fn url(&self, dbname: &str) -> String {
        self.server.url(dbname)
    }

    /// A SQL session as the superuser.
    pub async fn client(&self, dbname: &str) -> tokio_postgres::Client {
        self.client_for(&self.url(dbname)).await
    }

    pub async fn client_for(&self, url: &str) -> tokio_postgres::Client {
        let info = walrelay::pg::conninfo::resolve(url, &walrelay::pg::conninfo::ProcessEnv)
            .expect("valid test URL");
        walrelay::pg::sql::connect(&info)
            .await
            .unwrap_or_else(|e| panic!("connecting to the test server: {e}"))
    }

    /// Create a database and return a session in it.
    pub async fn create_db(&self, name: &str) -> tokio_postgres::Client {
        let admin = self.client("postgres").await;
        admin
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .expect("CREATE DATABASE");
        self.client(name).await
    }

    pub fn stop(&self, mode: StopMode) {
        self.server.stop(mode).expect("stopping the test server");
    }

    pub fn restart(&self) {
        self.server.restart().expect("restarting the test server");
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.server.log_tail(lines)
    }
}

impl Drop for TestPg {
    fn drop(&mut self) {
        let _ = self.server.stop(StopMode::Immediate);
        let _ = fs::remove_dir_all(&self.server.options.base_dir);
    }
}

fn next_dir() -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    Path::new(ROOT).join(format!("{}-{n}", std::process::id()))
}

/// A port that was free a moment ago (the server start retries if it is taken meanwhile).
pub fn free_port() -> u16 {
    walrelay::pg::local::pick_free_port().expect("binding an ephemeral port")
}

/// Remove servers left by test processes that no longer run.
fn clean_leftovers() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = fs::create_dir_all(ROOT);
        let Ok(entries) = fs::read_dir(ROOT) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = name.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
                continue;
            };
            let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
            if alive {
                continue;
            }
            let path = entry.path();
            // Processes a test started and recorded here (etcd, HA agents) go first, or
            // an agent would start its server again.
            for file in fs::read_dir(&path).into_iter().flatten().flatten() {
                if file.path().extension().is_some_and(|e| e == "pid") {
                    if let Some(pid) = fs::read_to_string(file.path())
                        .ok()
                        .and_then(|t| t.trim().parse::<i32>().ok())
                    {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                }
            }
            if let Some(pm) = walrelay::pg::local::postmaster_pid(&path.join("data")) {
                let pm = nix::unistd::Pid::from_raw(pm);
                let _ = nix::sys::signal::kill(pm, nix::sys::signal::Signal::SIGQUIT);
                walrelay::pg::local::wait_for_exit(pm.as_raw(), Duration::from_secs(10));
            }
            let _ = fs::remove_dir_all(&path);
        }
    });
}

/// Poll `condition` until it returns `Some`, or panic with `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut condition: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(10);
    loop {
        if let Some(v) = condition().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(250));
    }
}

/// A fresh directory for one test's files, removed with the test process's other leftovers
/// (a `data/` inside it holding a running server is stopped first).
pub fn scratch_dir() -> PathBuf {
    clean_leftovers();
    let dir = next_dir();
    fs::create_dir_all(&dir).expect("creating a scratch directory");
    dir
}

/// A real etcd (Debian's `etcd-server`) on free loopback ports, one member, its data in a
/// directory of its own; stopped and removed when dropped.
pub struct TestEtcd {
    pub dir: PathBuf,
    pub client_port: u16,
    peer_port: u16,
    child: Option<std::process::Child>,
}

impl TestEtcd {
    pub fn start() -> TestEtcd {
        let dir = scratch_dir();
        let mut etcd = TestEtcd {
            dir,
            client_port: free_port(),
            peer_port: free_port(),
            child: None,
        };
        etcd.resume();
        etcd
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// Start (again) with the same data: leases and keys survive a stop.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "etcd runs already");
        let log = fs::File::create(self.dir.join("etcd.log")).expect("etcd log");
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let child = std::process::Command::new("etcd")
            .args(["--name", "test", "--data-dir"])
            .arg(self.dir.join("data.etcd"))
            .args(["--listen-client-urls", &self.url()])
            .args(["--advertise-client-urls", &self.url()])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("test={peer}")])
            .stdout(log.try_clone().expect("etcd log"))
            .stderr(log)
            .spawn()
            .expect("starting etcd: install Debian's etcd-server (.ci/run does)");
        let _ = fs::write(self.dir.join("etcd.pid"), child.id().to_string());
        self.child = Some(child);
        let addr = format!("127.0.0.1:{}", self.client_port);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "etcd did not start: {}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kill etcd (SIGKILL): it is gone until `resume`.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default();
        walrelay::pg::local::last_lines(&log, 20)
    }
}

impl Drop for TestEtcd {
    fn drop(&mut self) {
        self.stop();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Files of a test certificate authority and a server certificate it signed.
#[derive(Debug, Clone)]
pub struct TestCerts {
    /// The CA's certificate (PEM): what a client trusts.
    pub ca: PathBuf,
    /// The server's certificate (PEM) and private key (PEM).
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A CA and a server certificate for `san` (as openssl's `subjectAltName` takes it, e.g.
/// `IP:127.0.0.1`) signed by it, made with the `openssl` command (`.ci/run` installs it)
/// in `dir`.
pub fn make_certs(dir: &Path, san: &str) -> TestCerts {
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .output()
            .expect("running openssl: install it (.ci/run does)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let req = |kind: &str, rest: &[&str]| {
        let mut args = vec!["req", kind];
        args.extend(ec);
        args.extend(rest);
        openssl(&args);
    };
    req(
        "-x509",
        &[
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=walrelay test CA",
        ],
    );
    req(
        "-new",
        &[
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=walrelay test server",
        ],
    );
    fs::write(dir.join("ext.cnf"), format!("subjectAltName={san}\n")).expect("ext.cnf");
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
    TestCerts {
        ca: dir.join("ca.pem"),
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
    }
}

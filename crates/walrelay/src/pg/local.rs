//! Local PostgreSQL servers run by walrelay itself: `initdb`, start, stop. Used by
//! `walrelay demo`, by the test kit, and by the HA agent's bootstrap.
//!
//! PostgreSQL refuses to run as root, so when walrelay runs as root the server binaries run
//! as the `postgres` OS user (or the one given), and the data directory is handed to it.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use nix::unistd::{Gid, Uid, User};

#[derive(Debug, thiserror::Error)]
pub enum LocalServerError {
    #[error("PostgreSQL server binaries not found: install PostgreSQL 15 (Debian: postgresql-15), or set PG_BINDIR to the directory holding initdb and pg_ctl")]
    NoBinaries,
    #[error("running as root and there is no OS user {0:?} to run PostgreSQL as: create it (Debian's postgresql package does)")]
    NoOsUser(String),
    #[error("{command} failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> LocalServerError {
    let path = path.to_path_buf();
    move |source| LocalServerError::Io { what, path, source }
}

/// The directory with `initdb`, `pg_ctl` and `postgres`: `$PG_BINDIR`, else
/// `pg_config --bindir`, else the newest `/usr/lib/postgresql/*/bin`.
pub fn find_bindir() -> Result<PathBuf, LocalServerError> {
    let has_initdb = |d: &Path| d.join("initdb").is_file() && d.join("pg_ctl").is_file();
    if let Some(d) = std::env::var_os("PG_BINDIR").map(PathBuf::from) {
        return if has_initdb(&d) {
            Ok(d)
        } else {
            Err(LocalServerError::NoBinaries)
        };
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let d = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && has_initdb(&d) {
            return Ok(d);
        }
    }
    let mut candidates: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((version, e.path().join("bin")))
        })
        .filter(|(_, d)| has_initdb(d))
        .collect();
    candidates.sort();
    candidates
        .pop()
        .map(|(_, d)| d)
        .ok_or(LocalServerError::NoBinaries)
}

/// The OS user the server runs as: `None` means "as this process".
fn server_os_user(name: &str) -> Result<Option<User>, LocalServerError> {
    if !Uid::effective().is_root() {
        return Ok(None);
    }
    User::from_name(name)
        .ok()
        .flatten()
        .map(Some)
        .ok_or_else(|| LocalServerError::NoOsUser(name.to_string()))
}

#[derive(Debug, Clone)]
pub struct LocalServerOptions {
    /// Directory under which `data/`, the socket and the log are kept.
    pub base_dir: PathBuf,
    pub port: u16,
    /// Name of the superuser that initdb creates.
    pub superuser: String,
    /// Its password; host connections require SCRAM authentication.
    pub password: String,
    /// Extra `postgresql.conf` settings, after walrelay's defaults.
    pub settings: Vec<(String, String)>,
    /// Enable data checksums (the HA bootstrap wants them; tests do not need them).
    pub data_checksums: bool,
    /// OS user to run as when walrelay runs as root.
    pub os_user: String,
}

impl LocalServerOptions {
    pub fn new(base_dir: impl Into<PathBuf>, port: u16) -> Self {
        LocalServerOptions {
            base_dir: base_dir.into(),
            port,
            superuser: "postgres".into(),
            password: "walrelay".into(),
            settings: Vec::new(),
            data_checksums: false,
            os_user: "postgres".into(),
        }
    }

    pub fn setting(mut self, name: &str, value: impl ToString) -> Self {
        self.settings.push((name.to_string(), value.to_string()));
        self
    }
}

/// A PostgreSQL server in a directory of its own, listening on 127.0.0.1 and a Unix socket.
#[derive(Debug, Clone)]
pub struct LocalServer {
    pub options: LocalServerOptions,
    pub bindir: PathBuf,
    run_as: Option<User>,
}

impl LocalServer {
    pub fn data_dir(&self) -> PathBuf {
        self.options.base_dir.join("data")
    }

    pub fn socket_dir(&self) -> PathBuf {
        self.options.base_dir.join("socket")
    }

    pub fn log_file(&self) -> PathBuf {
        self.options.base_dir.join("server.log")
    }

    pub fn port(&self) -> u16 {
        self.options.port
    }

    /// A server whose data directory exists already, or is about to be made by another
    /// tool (pg_basebackup): no initdb.
    pub fn open(options: LocalServerOptions) -> Result<Self, LocalServerError> {
        let bindir = find_bindir()?;
        let run_as = server_os_user(&options.os_user)?;
        let server = LocalServer {
            options,
            bindir,
            run_as,
        };
        let base = &server.options.base_dir;
        fs::create_dir_all(server.socket_dir()).map_err(io_err("creating", base))?;
        server.hand_over(base)?;
        server.hand_over(&server.socket_dir())?;
        Ok(server)
    }

    /// Run one of the server binaries (as the server's OS user) and return its standard
    /// output; a failure carries its standard error.
    pub fn exec(
        &self,
        program: &str,
        args: &[&std::ffi::OsStr],
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Result<String, LocalServerError> {
        let mut cmd = self.command(program);
        cmd.args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = run(cmd, program)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Write a file the server reads (its OS user owns it), with `mode`.
    pub fn write_owned(
        &self,
        path: &Path,
        contents: impl AsRef<[u8]>,
        mode: u32,
    ) -> Result<(), LocalServerError> {
        use std::os::unix::fs::PermissionsExt;
        fs::write(path, contents).map_err(io_err("writing", path))?;
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .map_err(io_err("setting the mode of", path))?;
        self.hand_over(path)
    }

    /// Create a directory (mode 0700) the server's user owns.
    pub fn create_dir_owned(&self, path: &Path) -> Result<(), LocalServerError> {
        use std::os::unix::fs::PermissionsExt;
        fs::create_dir_all(path).map_err(io_err("creating", path))?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o700))
            .map_err(io_err("setting the mode of", path))?;
        self.hand_over(path)
    }

    /// Create the cluster with initdb (fixed locale and encoding, no fsync during init) and
    /// the settings logical replication needs.
    pub fn init(options: LocalServerOptions) -> Result<Self, LocalServerError> {
        let server = Self::open(options)?;
        let base = &server.options.base_dir;
        let pwfile = base.join("pwfile");
        fs::write(&pwfile, &server.options.password).map_err(io_err("writing", &pwfile))?;
        server.hand_over(&pwfile)?;

        let data_dir = server.data_dir();
        let mut initdb = server.command("initdb");
        initdb
            .arg("-D")
            .arg(&data_dir)
            .args(["--no-sync", "--encoding=UTF8", "--locale=C"])
            .args(["--auth-local=trust", "--auth-host=scram-sha-256"])
            .arg(format!("--username={}", server.options.superuser))
            .arg(format!("--pwfile={}", pwfile.display()));
        if server.options.data_checksums {
            initdb.arg("--data-checksums");
        }
        run(initdb, "initdb")?;
        let _ = fs::remove_file(&pwfile);

        let mut conf = String::from("\n# walrelay local server\n");
        let defaults = [
            ("listen_addresses", "'127.0.0.1'".to_string()),
            ("port", server.options.port.to_string()),
            (
                "unix_socket_directories",
                format!("'{}'", server.socket_dir().display()),
            ),
            ("wal_level", "logical".into()),
            ("max_wal_senders", "20".into()),
            ("max_replication_slots", "20".into()),
            ("max_connections", "60".into()),
            ("shared_buffers", "64MB".into()),
            ("logging_collector", "off".into()),
        ];
        for (k, v) in defaults {
            conf.push_str(&format!("{k} = {v}\n"));
        }
        for (k, v) in &server.options.settings {
            conf.push_str(&format!("{k} = {v}\n"));
        }
        let conf_path = data_dir.join("postgresql.conf");
        let mut existing = fs::read_to_string(&conf_path).map_err(io_err("reading", &conf_path))?;
        existing.push_str(&conf);
        fs::write(&conf_path, existing).map_err(io_err("writing", &conf_path))?;
        // Replication connections from loopback with a password.
        let hba_path = data_dir.join("pg_hba.conf");
        let mut hba = fs::read_to_string(&hba_path).map_err(io_err("reading", &hba_path))?;
        hba.push_str("host replication all 127.0.0.1/32 scram-sha-256\n");
        fs::write(&hba_path, hba).map_err(io_err("writing", &hba_path))?;
        Ok(server)
    }

    /// Start and wait until the server accepts connections.
    pub fn start(&self) -> Result<(), LocalServerError> {
        let mut pg_ctl = self.command("pg_ctl");
        pg_ctl
            .arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.log_file())
            .args(["-w", "-t", "120", "start"]);
        run(pg_ctl, "pg_ctl start")
            .map(|_| ())
            .map_err(|e| match e {
                LocalServerError::Command { command, stderr } => LocalServerError::Command {
                    command,
                    stderr: format!("{stderr}\nserver log:\n{}", self.log_tail(20)),
                },
                other => other,
            })
    }

    /// Stop: `fast` (clean) or `immediate` (like a crash).
    pub fn stop(&self, mode: StopMode) -> Result<(), LocalServerError> {
        if !self.data_dir().join("postmaster.pid").exists() {
            return Ok(());
        }
        let mut pg_ctl = self.command("pg_ctl");
        pg_ctl
            .arg("-D")
            .arg(self.data_dir())
            .args(["-w", "-t", "60", "-m", mode.as_str(), "stop"]);
        run(pg_ctl, "pg_ctl stop").map(|_| ())
    }

    /// Restart with the same settings.
    pub fn restart(&self) -> Result<(), LocalServerError> {
        self.stop(StopMode::Fast)?;
        self.start()
    }

    /// Append settings to postgresql.conf (they take effect at the next start or reload).
    pub fn append_settings(&self, settings: &[(&str, &str)]) -> Result<(), LocalServerError> {
        let conf_path = self.data_dir().join("postgresql.conf");
        let mut conf = fs::read_to_string(&conf_path).map_err(io_err("reading", &conf_path))?;
        for (k, v) in settings {
            conf.push_str(&format!("{k} = {v}\n"));
        }
        fs::write(&conf_path, conf).map_err(io_err("writing", &conf_path))
    }

    /// `postgresql://user:password@127.0.0.1:port/dbname` for the superuser.
    pub fn url(&self, dbname: &str) -> String {
        format!(
            "postgresql://{}:{}@127.0.0.1:{}/{}?sslmode=disable",
            self.options.superuser, self.options.password, self.options.port, dbname
        )
    }

    /// The last lines of the server log, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        last_lines(
            &fs::read_to_string(self.log_file()).unwrap_or_default(),
            lines,
        )
    }

    /// A command for one of the server binaries, run as the server's OS user.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bindir.join(program));
        if let Some(user) = &self.run_as {
            use std::os::unix::process::CommandExt;
            cmd.uid(user.uid.as_raw()).gid(user.gid.as_raw());
            cmd.env("HOME", &user.dir);
        }
        // The server and the tools must not inherit the caller's libpq settings or locale:
        // libpq takes PGPASSWORD before a passfile, so a password exported for psql would
        // stand in for the replication password in a replica's primary_conninfo (and in
        // pg_basebackup's and pg_rewind's connections); PGSSLMODE, PGSERVICE and the rest
        // would change those connections too. What they need is passed explicitly.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("PG") {
                cmd.env_remove(name);
            }
        }
        cmd.env("LC_ALL", "C");
        cmd.stdin(Stdio::null());
        cmd
    }

    /// Give `path` to the server's OS user.
    fn hand_over(&self, path: &Path) -> Result<(), LocalServerError> {
        if let Some(user) = &self.run_as {
            chown(path, user.uid, user.gid)?;
        }
        Ok(())
    }
}

fn chown(path: &Path, uid: Uid, gid: Gid) -> Result<(), LocalServerError> {
    nix::unistd::chown(path, Some(uid), Some(gid)).map_err(|e| LocalServerError::Io {
        what: "changing the owner of",
        path: path.to_path_buf(),
        source: e.into(),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    Fast,
    Immediate,
}

impl StopMode {
    fn as_str(self) -> &'static str {
        match self {
            StopMode::Fast => "fast",
            StopMode::Immediate => "immediate",
        }
    }
}

fn run(mut cmd: Command, name: &str) -> Result<Output, LocalServerError> {
    let out = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| LocalServerError::Command {
            command: name.to_string(),
            stderr: e.to_string(),
        })?;
    if out.status.success() {
        Ok(out)
    } else {
        let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if stderr.is_empty() {
            stderr = String::from_utf8_lossy(&out.stdout).trim().to_string();
        }
        Err(LocalServerError::Command {
            command: name.to_string(),
            stderr,
        })
    }
}

/// The last `n` lines of `text` (of a log, for an error message).
pub fn last_lines(text: &str, n: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(n)..].join("\n")
}

/// The postmaster's pid from `data_dir/postmaster.pid` (whether or not it still runs).
pub fn postmaster_pid(data_dir: &Path) -> Option<i32> {
    let text = fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    text.lines().next()?.trim().parse().ok()
}

/// A loopback port that was free a moment ago. A server started on it retries elsewhere if
/// another process took it meanwhile.
pub fn pick_free_port() -> std::io::Result<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()
        .map(|a| a.port())
}

/// Wait for `pid` to exit, polling; used after signalling a server we do not own.
pub fn wait_for_exit(pid: i32, timeout: Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

//! Connection strings the way libpq reads them: a `postgresql://` URI or `key=value` pairs,
//! completed from the `PG*` environment variables, `~/.pgpass` and libpq's defaults.
//!
//! Written here rather than taken from tokio-postgres's `Config` parser because that parser
//! rejects keys DBAs use (`sslrootcert`, `sslcert`, `passfile`, `hostaddr`) and knows neither
//! the environment nor the password file.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use percent_encoding::percent_decode_str;

/// A password, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    /// libpq tries plain first; walrelay treats it as `prefer`.
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(s: &str) -> Result<Self, ConnInfoError> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(ConnInfoError::InvalidValue {
                    key: "sslmode".into(),
                    value: other.into(),
                    expected: "disable, allow, prefer, require, verify-ca or verify-full",
                })
            }
        })
    }

    /// TLS must be used: the server saying no is an error.
    pub fn requires_tls(self) -> bool {
        matches!(
            self,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull
        )
    }
}

/// Where the trusted root certificates come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCerts {
    /// A PEM file (`sslrootcert=path`, default `~/.postgresql/root.crt`).
    File(PathBuf),
    /// The operating system's trust store (`sslrootcert=system`).
    System,
}

/// Which server of several (`target_session_attrs`): libpq's values that make sense for a
/// client that writes or decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SessionAttrs {
    /// The first server that answers.
    #[default]
    Any,
    /// One that takes writes (`transaction_read_only` is off).
    ReadWrite,
    /// One not in recovery.
    Primary,
}

impl SessionAttrs {
    const ALL: [SessionAttrs; 3] = [
        SessionAttrs::Any,
        SessionAttrs::ReadWrite,
        SessionAttrs::Primary,
    ];

    /// As written in a connection string.
    pub fn name(self) -> &'static str {
        match self {
            SessionAttrs::Any => "any",
            SessionAttrs::ReadWrite => "read-write",
            SessionAttrs::Primary => "primary",
        }
    }

    fn parse(s: &str) -> Result<Self, ConnInfoError> {
        Self::ALL
            .into_iter()
            .find(|a| a.name() == s)
            .ok_or_else(|| ConnInfoError::InvalidValue {
                key: "target_session_attrs".into(),
                value: s.into(),
                expected: "any, read-write or primary",
            })
    }
}

/// Everything needed to open a connection, fully resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnInfo {
    /// Host name, IP address, or the directory of a Unix socket (starts with `/`): the first
    /// of `hosts`, or the one `pg::locate::locate` chose.
    pub host: String,
    /// Connect to this address instead of resolving `host` (TLS still checks `host`).
    pub hostaddr: Option<IpAddr>,
    pub port: u16,
    pub user: String,
    pub password: Option<Secret>,
    pub dbname: String,
    pub sslmode: SslMode,
    pub sslrootcert: Option<RootCerts>,
    pub sslcert: Option<PathBuf>,
    pub sslkey: Option<PathBuf>,
    pub application_name: String,
    pub connect_timeout: Duration,
    /// Command-line options sent at connection start (`-c name=value ...`).
    pub options: Option<String>,
    /// Every server the string names, in order (libpq's `host=a,b port=1,2`); one for most.
    pub hosts: Vec<(String, u16)>,
    pub target_session_attrs: SessionAttrs,
}

impl ConnInfo {
    pub fn is_unix_socket(&self) -> bool {
        self.host.starts_with('/')
    }

    /// A description for logs and error messages; never includes the password.
    pub fn describe(&self) -> String {
        format!(
            "host={} port={} user={} dbname={}",
            self.host, self.port, self.user, self.dbname
        )
    }

    /// The `i`-th of `hosts`, alone.
    pub fn with_host(&self, i: usize) -> ConnInfo {
        let (host, port) = self.hosts[i].clone();
        ConnInfo {
            host,
            port,
            hosts: vec![self.hosts[i].clone()],
            ..self.clone()
        }
    }

    /// The same server, another database.
    pub fn with_dbname(&self, dbname: &str) -> ConnInfo {
        ConnInfo {
            dbname: dbname.to_string(),
            ..self.clone()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnInfoError {
    #[error("invalid connection string: {0}")]
    Syntax(String),
    #[error("invalid connection option {0:?}: walrelay understands host, hostaddr, port, user, password, dbname, sslmode, sslrootcert, sslcert, sslkey, application_name, connect_timeout, options, passfile, target_session_attrs")]
    UnknownKey(String),
    #[error("invalid value {value:?} for connection option {key}: expected {expected}")]
    InvalidValue {
        key: String,
        value: String,
        expected: &'static str,
    },
    #[error("{hosts} hosts but {ports} ports: give one port for all, or one per host")]
    PortCount { hosts: usize, ports: usize },
    #[error("hostaddr cannot be combined with several hosts")]
    HostaddrWithHosts,
}

/// The process environment, behind a function so that tests can supply their own.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
    fn home(&self) -> Option<PathBuf>;
    fn os_user(&self) -> Option<String>;
}

/// The real environment of this process.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
    fn home(&self) -> Option<PathBuf> {
        self.var("HOME").map(PathBuf::from).or_else(|| {
            nix::unistd::User::from_uid(nix::unistd::getuid())
                .ok()
                .flatten()
                .map(|u| u.dir)
        })
    }
    fn os_user(&self) -> Option<String> {
        nix::unistd::User::from_uid(nix::unistd::getuid())
            .ok()
            .flatten()
            .map(|u| u.name)
            .or_else(|| self.var("USER"))
    }
}

const KNOWN_KEYS: &[&str] = &[
    "host",
    "hostaddr",
    "port",
    "user",
    "password",
    "dbname",
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "application_name",
    "connect_timeout",
    "options",
    "passfile",
    "target_session_attrs",
];

/// Parse a connection string and complete it from the environment, like libpq.
pub fn resolve(conn_str: &str, env: &dyn Env) -> Result<ConnInfo, ConnInfoError> {
    let given = parse(conn_str)?;
    complete(given, env)
}

/// The key/value pairs written in a connection string, not yet completed.
pub fn parse(conn_str: &str) -> Result<BTreeMap<String, String>, ConnInfoError> {
    let s = conn_str.trim();
    let pairs = if s.starts_with("postgresql://") || s.starts_with("postgres://") {
        parse_uri(s)?
    } else {
        parse_key_values(s)?
    };
    for key in pairs.keys() {
        if !KNOWN_KEYS.contains(&key.as_str()) {
            return Err(ConnInfoError::UnknownKey(key.clone()));
        }
    }
    Ok(pairs)
}

fn decode(s: &str) -> Result<String, ConnInfoError> {
    percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| ConnInfoError::Syntax(format!("{s:?} is not valid percent-encoded UTF-8")))
}

fn parse_uri(s: &str) -> Result<BTreeMap<String, String>, ConnInfoError> {
    let mut out = BTreeMap::new();
    let rest = s.split_once("://").map(|(_, r)| r).unwrap_or(s);
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match rest.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (rest, None),
    };
    // An '@' past the host part with none in it, in the path or in a parameter's name:
    // most likely a password holding '/' or '?', which end the host part as in libpq.
    // Taken apart, its pieces would show up as a port, a database name or a parameter in
    // messages, so it is refused without echoing any. (`?user=alice@REALM` is fine.)
    let in_a_name = |q: &str| {
        q.split('&')
            .any(|pair| pair.split('=').next().is_some_and(|k| k.contains('@')))
    };
    if !authority.contains('@')
        && (path.is_some_and(|p| p.contains('@')) || query.is_some_and(in_a_name))
    {
        return Err(ConnInfoError::Syntax(
            "an '@' after the host part of the URI: percent-encode a '/' or '?' in the password (%2F, %3F), or an '@' elsewhere (%40)".into(),
        ));
    }
    let hostport = match authority.rsplit_once('@') {
        Some((userinfo, hp)) => {
            let (user, password) = match userinfo.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (userinfo, None),
            };
            if !user.is_empty() {
                out.insert("user".into(), decode(user)?);
            }
            if let Some(p) = password {
                out.insert("password".into(), decode(p)?);
            }
            hp
        }
        None => authority,
    };
    // libpq's multi-host form, `h1:5432,h2:5432`, becomes `host=h1,h2 port=5432,5432`.
    let mut hosts = Vec::new();
    let mut ports = Vec::new();
    for one in hostport.split(',') {
        let (host, port) = split_host_port(one)?;
        hosts.push(decode(host)?);
        ports.push(decode(port.unwrap_or(""))?);
    }
    if hosts.iter().any(|h| !h.is_empty()) {
        out.insert("host".into(), hosts.join(","));
    }
    if ports.iter().any(|p| !p.is_empty()) {
        out.insert("port".into(), ports.join(","));
    }
    if let Some(db) = path.filter(|p| !p.is_empty()) {
        out.insert("dbname".into(), decode(db)?);
    }
    if let Some(q) = query {
        for pair in q.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').ok_or_else(|| {
                ConnInfoError::Syntax(format!("URI parameter {pair:?} has no '='"))
            })?;
            out.insert(decode(k)?, decode(v)?);
        }
    }
    Ok(out)
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`.
fn split_host_port(hostport: &str) -> Result<(&str, Option<&str>), ConnInfoError> {
    if let Some(inner) = hostport.strip_prefix('[') {
        let (h, after) = inner
            .split_once(']')
            .ok_or_else(|| ConnInfoError::Syntax("unterminated [ in IPv6 host".into()))?;
        return match after.strip_prefix(':') {
            Some(p) => Ok((h, Some(p))),
            None if after.is_empty() => Ok((h, None)),
            None => Err(ConnInfoError::Syntax(format!(
                "unexpected {after:?} after IPv6 host"
            ))),
        };
    }
    Ok(match hostport.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (hostport, None),
    })
}

fn parse_key_values(s: &str) -> Result<BTreeMap<String, String>, ConnInfoError> {
    let mut out = BTreeMap::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return Err(ConnInfoError::Syntax(format!(
                "missing \"=\" after {key:?}; write key=value pairs or a postgresql:// URI"
            )));
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            loop {
                match chars.next() {
                    None => {
                        return Err(ConnInfoError::Syntax(format!(
                            "unterminated quoted value for {key:?}"
                        )))
                    }
                    Some('\\') => match chars.next() {
                        Some(c) => value.push(c),
                        None => {
                            return Err(ConnInfoError::Syntax(format!(
                                "unterminated quoted value for {key:?}"
                            )))
                        }
                    },
                    Some('\'') => break,
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                chars.next();
                if c == '\\' {
                    if let Some(e) = chars.next() {
                        value.push(e);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        if key.is_empty() {
            return Err(ConnInfoError::Syntax("empty key before \"=\"".into()));
        }
        out.insert(key, value);
    }
}

/// Fill in what the connection string left out, in libpq's order: the string, then the
/// `PG*` environment variables, then the password file, then the built-in defaults.
pub fn complete(given: BTreeMap<String, String>, env: &dyn Env) -> Result<ConnInfo, ConnInfoError> {
    let get = |key: &str, var: &str| given.get(key).cloned().or_else(|| env.var(var));

    let host = get("host", "PGHOST").unwrap_or_else(default_host);
    let hostaddr = match get("hostaddr", "PGHOSTADDR") {
        Some(a) => Some(a.parse().map_err(|_| ConnInfoError::InvalidValue {
            key: "hostaddr".into(),
            value: a,
            expected: "an IPv4 or IPv6 address",
        })?),
        None => None,
    };
    let host_list: Vec<String> = host.split(',').map(|h| h.trim().to_string()).collect();
    let port_list = match get("port", "PGPORT") {
        Some(ports) => ports
            .split(',')
            .map(|p| match p.trim() {
                "" => Ok(5432),
                p => p.parse().map_err(|_| ConnInfoError::InvalidValue {
                    key: "port".into(),
                    value: p.into(),
                    expected: "a port number from 1 to 65535",
                }),
            })
            .collect::<Result<Vec<u16>, _>>()?,
        None => vec![5432],
    };
    let hosts: Vec<(String, u16)> = match (host_list.len(), port_list.len()) {
        (_, 1) => host_list
            .iter()
            .map(|h| (h.clone(), port_list[0]))
            .collect(),
        (h, p) if h == p => host_list.iter().cloned().zip(port_list).collect(),
        (hosts, ports) => return Err(ConnInfoError::PortCount { hosts, ports }),
    };
    let hosts: Vec<(String, u16)> = hosts
        .into_iter()
        .map(|(h, p)| (if h.is_empty() { default_host() } else { h }, p))
        .collect();
    if hosts.len() > 1 && hostaddr.is_some() {
        return Err(ConnInfoError::HostaddrWithHosts);
    }
    let (host, port) = hosts[0].clone();
    let target_session_attrs = match get("target_session_attrs", "PGTARGETSESSIONATTRS") {
        Some(a) => SessionAttrs::parse(&a)?,
        None => SessionAttrs::Any,
    };
    let user = get("user", "PGUSER")
        .or_else(|| env.os_user())
        .unwrap_or_else(|| "postgres".into());
    let dbname = get("dbname", "PGDATABASE").unwrap_or_else(|| user.clone());
    let sslmode = match get("sslmode", "PGSSLMODE") {
        Some(m) => SslMode::parse(&m)?,
        None => SslMode::Prefer,
    };
    let postgresql_dir = env.home().map(|h| h.join(".postgresql"));
    let sslrootcert = match get("sslrootcert", "PGSSLROOTCERT") {
        Some(s) if s == "system" => Some(RootCerts::System),
        Some(s) => Some(RootCerts::File(PathBuf::from(s))),
        None => postgresql_dir
            .as_ref()
            .map(|d| d.join("root.crt"))
            .filter(|p| p.exists())
            .map(RootCerts::File),
    };
    // libpq: with sslmode=require and a root certificate available, verify like verify-ca.
    let sslmode = if sslmode == SslMode::Require && sslrootcert.is_some() {
        SslMode::VerifyCa
    } else {
        sslmode
    };
    let default_client_file = |name: &str| {
        postgresql_dir
            .as_ref()
            .map(|d| d.join(name))
            .filter(|p| p.exists())
    };
    let sslcert = get("sslcert", "PGSSLCERT")
        .map(PathBuf::from)
        .or_else(|| default_client_file("postgresql.crt"));
    let sslkey = get("sslkey", "PGSSLKEY")
        .map(PathBuf::from)
        .or_else(|| default_client_file("postgresql.key"));
    let application_name =
        get("application_name", "PGAPPNAME").unwrap_or_else(|| "walrelay".into());
    let connect_timeout = match get("connect_timeout", "PGCONNECT_TIMEOUT") {
        Some(t) => {
            let secs: u64 = t.parse().map_err(|_| ConnInfoError::InvalidValue {
                key: "connect_timeout".into(),
                value: t,
                expected: "a whole number of seconds",
            })?;
            // libpq: 0 means wait forever, and anything below 2 s is raised to 2 s.
            if secs == 0 {
                Duration::from_secs(3600)
            } else {
                Duration::from_secs(secs.max(2))
            }
        }
        None => Duration::from_secs(10),
    };
    let options = get("options", "PGOPTIONS");

    let mut info = ConnInfo {
        host,
        hostaddr,
        port,
        user,
        password: None,
        dbname,
        sslmode,
        sslrootcert,
        sslcert,
        sslkey,
        application_name,
        connect_timeout,
        options,
        hosts,
        target_session_attrs,
    };
    info.password = match get("password", "PGPASSWORD") {
        Some(p) => Some(Secret::new(p)),
        None => {
            let passfile = get("passfile", "PGPASSFILE")
                .map(PathBuf::from)
                .or_else(|| env.home().map(|h| h.join(".pgpass")));
            passfile
                .and_then(|f| pgpass_lookup(&f, &info))
                .map(Secret::new)
        }
    };
    Ok(info)
}

fn default_host() -> String {
    // Debian's libpq looks for the socket here; other builds use /tmp.
    for dir in ["/var/run/postgresql", "/tmp"] {
        if Path::new(dir).is_dir() && Path::new(dir).join(".s.PGSQL.5432").exists() {
            return dir.to_string();
        }
    }
    "localhost".to_string()
}

/// The password for `info` from a `.pgpass` file, as libpq finds it: the first line whose
/// `host:port:database:user` fields match, `*` matching anything. A file that others can read
/// is ignored, as libpq ignores it.
pub fn pgpass_lookup(path: &Path, info: &ConnInfo) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_file() {
        return None;
    }
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(
            file = %path.display(),
            "password file has group or world access; permissions should be u=rw (0600) or less; ignoring it"
        );
        return None;
    }
    let content = std::fs::read_to_string(path).ok()?;
    let host = if info.is_unix_socket() {
        "localhost"
    } else {
        info.host.as_str()
    };
    let port = info.port.to_string();
    let wanted = [
        host,
        port.as_str(),
        info.dbname.as_str(),
        info.user.as_str(),
    ];
    content.lines().find_map(|line| {
        if line.starts_with('#') || line.trim().is_empty() {
            return None;
        }
        let fields = split_pgpass_line(line);
        if fields.len() < 5 {
            return None;
        }
        let matches = fields[..4]
            .iter()
            .zip(wanted)
            .all(|(field, want)| field == "*" || field == want);
        matches.then(|| fields[4..].join(":"))
    })
}

fn split_pgpass_line(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(e) = chars.next() {
                    if let Some(f) = fields.last_mut() {
                        f.push(e)
                    }
                }
            }
            ':' if fields.len() < 5 => fields.push(String::new()),
            c => {
                if let Some(f) = fields.last_mut() {
                    f.push(c)
                }
            }
        }
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct FakeEnv(HashMap<&'static str, String>, Option<PathBuf>);
    impl Env for FakeEnv {
        fn var(&self, name: &str) -> Option<String> {
            self.0.get(name).cloned()
        }
        fn home(&self) -> Option<PathBuf> {
            self.1.clone()
        }
        fn os_user(&self) -> Option<String> {
            Some("osuser".into())
        }
    }
    fn empty_env() -> FakeEnv {
        FakeEnv(HashMap::new(), None)
    }

    #[test]
    fn a_password_with_a_slash_or_question_mark_is_refused_without_echoing_it() {
        for url in [
            "postgresql://relay:Ab/cd99@db.example/app",
            "postgresql://relay:Ab?cd99@db.example/app",
            "postgres://relay:12/3499@db.example:5432/app?sslmode=require",
        ] {
            let err = parse_uri(url).unwrap_err().to_string();
            assert!(err.contains("percent-encode"), "{err}");
            assert!(!err.contains("cd99") && !err.contains("3499"), "{err}");
        }
        // Encoded, and an '@' in a parameter's value: fine.
        let ok =
            parse_uri("postgresql://relay:Ab%2Fcd@db.example/app?application_name=a@b").unwrap();
        assert_eq!(ok["password"], "Ab/cd");
        assert_eq!(ok["application_name"], "a@b");
        let kerberos = parse_uri("postgresql://db.example/app?user=alice@EXAMPLE.COM").unwrap();
        assert_eq!(kerberos["user"], "alice@EXAMPLE.COM");
    }

    #[test]
    fn several_hosts_in_a_uri_or_key_values() {
        let i = resolve(
            "postgresql://u@h1:5001,h2,[::1]:5003/db?target_session_attrs=read-write",
            &empty_env(),
        )
        .unwrap();
        assert_eq!(
            i.hosts,
            [
                ("h1".to_string(), 5001),
                ("h2".into(), 5432),
                ("::1".into(), 5003)
            ]
        );
        assert_eq!((i.host.as_str(), i.port), ("h1", 5001));
        assert_eq!(i.target_session_attrs, SessionAttrs::ReadWrite);
        let second = i.with_host(1);
        assert_eq!((second.host.as_str(), second.port), ("h2", 5432));
        assert_eq!(second.hosts.len(), 1);

        let one_port = resolve("host=a,b port=6000 user=u", &empty_env()).unwrap();
        assert_eq!(
            one_port.hosts,
            [("a".to_string(), 6000), ("b".into(), 6000)]
        );
        assert!(matches!(
            resolve("host=a,b,c port=1,2 user=u", &empty_env()),
            Err(ConnInfoError::PortCount { hosts: 3, ports: 2 })
        ));
        assert!(matches!(
            resolve("host=a,b hostaddr=127.0.0.1 user=u", &empty_env()),
            Err(ConnInfoError::HostaddrWithHosts)
        ));
        assert!(matches!(
            resolve("host=a target_session_attrs=standby", &empty_env()),
            Err(ConnInfoError::InvalidValue { .. })
        ));
    }

    #[test]
    fn uri_with_everything() {
        let i = resolve(
            "postgresql://rep%40l:p%3Ass@db.example.com:6543/my%20db?sslmode=require&application_name=x",
            &empty_env(),
        )
        .unwrap();
        assert_eq!(i.user, "rep@l");
        assert_eq!(i.password.as_ref().unwrap().expose(), "p:ss");
        assert_eq!(i.host, "db.example.com");
        assert_eq!(i.port, 6543);
        assert_eq!(i.dbname, "my db");
        assert_eq!(i.sslmode, SslMode::Require);
        assert_eq!(i.application_name, "x");
    }

    #[test]
    fn uri_ipv6_and_socket_dir() {
        let i = resolve("postgres://[::1]:5433/app", &empty_env()).unwrap();
        assert_eq!(i.host, "::1");
        assert_eq!(i.port, 5433);
        let i = resolve("postgresql://%2Fvar%2Frun%2Fpostgresql/app", &empty_env()).unwrap();
        assert!(i.is_unix_socket());
        assert_eq!(i.host, "/var/run/postgresql");
    }

    #[test]
    fn key_value_with_quotes() {
        let i = resolve(
            r"host=127.0.0.1 port = 5999 user=u password='it\'s a \\secret' dbname=d",
            &empty_env(),
        )
        .unwrap();
        assert_eq!(i.password.unwrap().expose(), r"it's a \secret");
        assert_eq!(i.port, 5999);
        assert_eq!(i.dbname, "d");
    }

    #[test]
    fn environment_fills_gaps_and_string_wins() {
        let env = FakeEnv(
            HashMap::from([
                ("PGHOST", "envhost".to_string()),
                ("PGPORT", "7000".to_string()),
                ("PGUSER", "envuser".to_string()),
                ("PGPASSWORD", "envpw".to_string()),
                ("PGSSLMODE", "disable".to_string()),
            ]),
            None,
        );
        let i = resolve("dbname=x port=7001", &env).unwrap();
        assert_eq!(i.host, "envhost");
        assert_eq!(i.port, 7001);
        assert_eq!(i.user, "envuser");
        assert_eq!(i.password.unwrap().expose(), "envpw");
        assert_eq!(i.sslmode, SslMode::Disable);
        assert_eq!(i.dbname, "x");
    }

    #[test]
    fn defaults_like_libpq() {
        let i = resolve("host=h", &empty_env()).unwrap();
        assert_eq!(i.user, "osuser");
        assert_eq!(i.dbname, "osuser");
        assert_eq!(i.port, 5432);
        assert_eq!(i.sslmode, SslMode::Prefer);
        assert!(i.password.is_none());
    }

    #[test]
    fn errors_name_the_problem() {
        let e = resolve("host=h bogus=1", &empty_env())
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"bogus\""), "{e}");
        let e = resolve("host=h port=abc", &empty_env())
            .unwrap_err()
            .to_string();
        assert!(e.contains("port"), "{e}");
        let e = resolve("host=h sslmode=maybe", &empty_env())
            .unwrap_err()
            .to_string();
        assert!(e.contains("sslmode"), "{e}");
        assert!(resolve("postgresql://a:1,b:2,c:3/db?port=1,2", &empty_env()).is_err());
        assert!(resolve("just-a-word", &empty_env()).is_err());
        assert!(resolve("password='open", &empty_env()).is_err());
    }

    #[test]
    fn password_is_not_printed() {
        let i = resolve("host=h password=hunter2", &empty_env()).unwrap();
        assert!(!format!("{i:?}").contains("hunter2"));
        assert!(!i.describe().contains("hunter2"));
    }

    #[test]
    fn pgpass_matching() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(".pgpass");
        std::fs::write(
            &file,
            "# comment\nother:*:*:*:nope\nh:5432:db:u:pa\\:ss:word\n*:*:*:u:fallback\n",
        )
        .unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let env = FakeEnv(HashMap::new(), Some(dir.path().to_path_buf()));
        let i = resolve("host=h user=u dbname=db", &env).unwrap();
        assert_eq!(i.password.unwrap().expose(), "pa:ss:word");
        let i = resolve("host=h2 user=u dbname=db", &env).unwrap();
        assert_eq!(i.password.unwrap().expose(), "fallback");
        // Readable by others: ignored, as libpq does.
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let i = resolve("host=h user=u dbname=db", &env).unwrap();
        assert!(i.password.is_none());
    }
}

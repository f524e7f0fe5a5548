//! A connection in replication mode (`replication=database`): startup and authentication,
//! replication commands such as `CREATE_REPLICATION_SLOT`, and the CopyBoth stream of
//! `START_REPLICATION` with its standby status updates. The same client also opens plain
//! sessions for reading `COPY ... TO STDOUT` in bulk: many rows per buffer, where
//! tokio-postgres hands over one message per row.
//!
//! Hand-written on `postgres-protocol` because tokio-postgres 0.7 has no CopyBoth support and
//! postgres-protocol's backend parser does not know CopyBothResponse (`'W'`). Frames are
//! parsed here with checked reads; authentication (MD5, SCRAM-SHA-256) uses postgres-protocol.

use bytes::{Buf, Bytes, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use walrelay_model::{Lsn, PgTimestamp};

use super::conninfo::ConnInfo;
use super::error::{PgError, ServerError};
use super::transport::{self, PgStream};
use super::wire::Reader;

/// The server refuses messages above 1 GB; anything larger is a broken stream.
const MAX_MESSAGE_LEN: usize = 1 << 30;

/// A message of the replication stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicationMessage {
    /// WAL data: for logical replication, one output-plugin message.
    XLogData {
        wal_start: Lsn,
        wal_end: Lsn,
        data: Bytes,
    },
    /// The server's position, and whether it wants a status update now.
    Keepalive { wal_end: Lsn, reply_requested: bool },
    /// The server ended the stream: CopyDone, or (when it shuts down) a bare CommandComplete.
    CopyDone,
}

/// The text result of a simple query.
#[derive(Debug, Default, Clone)]
pub struct QueryResult {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Option<String>>>,
}

impl QueryResult {
    /// The value of `column` in the first row.
    pub fn first(&self, column: &str) -> Option<&str> {
        let idx = self.columns.iter().position(|c| c == column)?;
        self.rows.first()?.get(idx)?.as_deref()
    }

    /// The value of `column` in the first row, which `command` must have returned: a
    /// missing value is an error, never an empty default.
    pub fn required(&self, command: &str, column: &str) -> Result<&str, PgError> {
        self.first(column).ok_or_else(|| PgError::Protocol {
            target: command.to_string(),
            detail: format!("the server returned no {column}"),
        })
    }

    /// The position in `column` of the first row: missing or unparsable is an error, never
    /// 0/0 (which would read as "from the beginning").
    pub fn lsn(&self, command: &str, column: &str) -> Result<Lsn, PgError> {
        let text = self.required(command, column)?;
        text.parse().map_err(|_| PgError::Protocol {
            target: command.to_string(),
            detail: format!("{column} {text:?} is not a WAL position"),
        })
    }
}

pub struct ReplicationConnection {
    stream: PgStream,
    inbuf: BytesMut,
    outbuf: BytesMut,
    target: String,
    /// A `copy_out` ended after its last data was handed over.
    copy_ended: bool,
}

impl ReplicationConnection {
    /// Connect in replication mode and authenticate within the `connect_timeout`.
    pub async fn connect(info: &ConnInfo) -> Result<Self, PgError> {
        Self::open(info, true).await
    }

    /// A plain session (not replication), for `copy_out`.
    pub async fn connect_plain(info: &ConnInfo) -> Result<Self, PgError> {
        Self::open(info, false).await
    }

    async fn open(info: &ConnInfo, replication: bool) -> Result<Self, PgError> {
        let stream = transport::connect(info).await?;
        let mut conn = ReplicationConnection {
            stream,
            inbuf: BytesMut::with_capacity(64 * 1024),
            outbuf: BytesMut::with_capacity(1024),
            target: info.describe(),
            copy_ended: false,
        };
        match tokio::time::timeout(info.connect_timeout, conn.startup(info, replication)).await {
            Ok(r) => r.map(|()| conn),
            Err(_) => Err(PgError::Transport(transport::TransportError::Timeout {
                target: conn.target.clone(),
                secs: info.connect_timeout.as_secs(),
            })),
        }
    }

    async fn startup(&mut self, info: &ConnInfo, replication: bool) -> Result<(), PgError> {
        let mut params: Vec<(&str, &str)> = vec![
            ("user", &info.user),
            ("database", &info.dbname),
            (
                "replication",
                if replication { "database" } else { "false" },
            ),
            ("application_name", &info.application_name),
            ("client_encoding", "UTF8"),
            // pgoutput prints values with the walsender's settings: fix them, so that the
            // same value always reads the same (timestamptz in UTC, ISO dates, exact floats).
            ("TimeZone", "UTC"),
            ("DateStyle", "ISO, YMD"),
            ("IntervalStyle", "postgres"),
            ("extra_float_digits", "3"),
        ];
        if let Some(o) = &info.options {
            params.push(("options", o));
        }
        frontend::startup_message(params.iter().copied(), &mut self.outbuf)
            .map_err(|e| self.io(e))?;
        self.flush().await?;
        let mut scram: Option<ScramSha256> = None;
        loop {
            let (tag, body) = self.read_message().await?;
            match tag {
                b'R' => self.authenticate(info, &body, &mut scram).await?,
                b'E' => {
                    let error = parse_error_fields(&body);
                    return Err(if error.code.starts_with("28") {
                        PgError::Auth {
                            target: self.target.clone(),
                            reason: error.message,
                        }
                    } else {
                        PgError::server(
                            format!("connecting to {} for replication", self.target),
                            error,
                        )
                    });
                }
                b'S' | b'K' | b'N' => {}
                b'Z' => return Ok(()),
                other => return Err(self.unexpected(other, "during startup")),
            }
        }
    }

    async fn authenticate(
        &mut self,
        info: &ConnInfo,
        body: &[u8],
        scram: &mut Option<ScramSha256>,
    ) -> Result<(), PgError> {
        let mut r = Reader::new(body);
        let code = r
            .i32()
            .ok_or_else(|| self.protocol("truncated authentication request"))?;
        let password = || {
            info.password.as_ref().map(|p| p.expose().as_bytes()).ok_or_else(|| PgError::Auth {
                target: self.target.clone(),
                reason: "the server asks for a password and none is configured: put it in the URL, PGPASSWORD or ~/.pgpass".into(),
            })
        };
        match code {
            0 => return Ok(()),
            3 => {
                let pw = password()?;
                frontend::password_message(pw, &mut self.outbuf).map_err(|e| self.io(e))?;
            }
            5 => {
                let salt: [u8; 4] = r
                    .bytes(4)
                    .and_then(|s| s.try_into().ok())
                    .ok_or_else(|| self.protocol("truncated MD5 salt"))?;
                let hash = postgres_protocol::authentication::md5_hash(
                    info.user.as_bytes(),
                    password()?,
                    salt,
                );
                frontend::password_message(hash.as_bytes(), &mut self.outbuf).map_err(|e| self.io(e))?;
            }
            10 => {
                let mut mechanisms = Vec::new();
                while let Some(m) = r.cstr() {
                    if m.is_empty() {
                        break;
                    }
                    mechanisms.push(m.to_string());
                }
                if !mechanisms.iter().any(|m| m == SCRAM_SHA_256) {
                    return Err(PgError::Auth {
                        target: self.target.clone(),
                        reason: format!("server offers only SASL mechanisms {mechanisms:?}; walrelay supports {SCRAM_SHA_256}"),
                    });
                }
                // Without channel binding: the client says it does not support it ("n"),
                // which the server accepts over TLS and plain connections alike.
                let s = ScramSha256::new(password()?, ChannelBinding::unsupported());
                frontend::sasl_initial_response(SCRAM_SHA_256, s.message(), &mut self.outbuf)
                    .map_err(|e| self.io(e))?;
                *scram = Some(s);
            }
            11 => {
                let s = scram.as_mut().ok_or_else(|| self.protocol("SASL continue without SASL start"))?;
                s.update(r.rest()).map_err(|e| PgError::Auth {
                    target: self.target.clone(),
                    reason: format!("SCRAM: {e}"),
                })?;
                frontend::sasl_response(s.message(), &mut self.outbuf).map_err(|e| self.io(e))?;
            }
            12 => {
                let s = scram.as_mut().ok_or_else(|| self.protocol("SASL final without SASL start"))?;
                s.finish(r.rest()).map_err(|e| PgError::Auth {
                    target: self.target.clone(),
                    reason: format!("SCRAM server signature: {e}"),
                })?;
                return Ok(());
            }
            other => {
                return Err(PgError::Auth {
                    target: self.target.clone(),
                    reason: format!("authentication method {other} is not supported (walrelay supports password, md5 and scram-sha-256)"),
                })
            }
        }
        self.flush().await
    }

    /// Run a replication command or a simple SQL query and collect its text result.
    pub async fn simple_query(&mut self, sql: &str) -> Result<QueryResult, PgError> {
        frontend::query(sql, &mut self.outbuf).map_err(|e| self.io(e))?;
        self.flush().await?;
        let mut result = QueryResult::default();
        let mut error = None;
        loop {
            let (tag, body) = self.read_message().await?;
            match tag {
                b'T' => {
                    result.columns = parse_row_description(&body)
                        .ok_or_else(|| self.protocol("bad RowDescription"))?
                }
                b'D' => result
                    .rows
                    .push(parse_data_row(&body).ok_or_else(|| self.protocol("bad DataRow"))?),
                b'C' | b'I' | b'N' | b'S' => {}
                b'E' => error = Some(parse_error_fields(&body)),
                b'Z' => break,
                other => return Err(self.unexpected(other, "in a query result")),
            }
        }
        match error {
            Some(error) => Err(PgError::server(command_name(sql), error)),
            None => Ok(result),
        }
    }

    /// Start `COPY ... TO STDOUT`; then `copy_out_next` reads its data.
    pub async fn copy_out(&mut self, sql: &str) -> Result<(), PgError> {
        frontend::query(sql, &mut self.outbuf).map_err(|e| self.io(e))?;
        self.flush().await?;
        loop {
            let (tag, body) = self.read_message().await?;
            match tag {
                b'H' => return Ok(()),
                b'N' | b'S' => {}
                b'E' => {
                    let error = parse_error_fields(&body);
                    while self.read_message().await?.0 != b'Z' {}
                    return Err(PgError::server("COPY", error));
                }
                other => return Err(self.unexpected(other, "in answer to COPY")),
            }
        }
    }

    /// The next data of a `copy_out`: the rows already received, up to about `max` bytes
    /// (at least one row); `None` once the copy has ended.
    pub async fn copy_out_next(&mut self, max: usize) -> Result<Option<Bytes>, PgError> {
        if std::mem::take(&mut self.copy_ended) {
            return Ok(None);
        }
        let mut chunk = BytesMut::new();
        loop {
            while chunk.len() < max {
                let Some((tag, body)) = self.take_buffered_message()? else {
                    break;
                };
                match tag {
                    b'd' => chunk.extend_from_slice(&body),
                    b'c' => {
                        // CommandComplete and ReadyForQuery follow.
                        loop {
                            match self.read_message().await? {
                                (b'Z', _) => break,
                                (b'E', body) => {
                                    return Err(PgError::server("COPY", parse_error_fields(&body)))
                                }
                                _ => {}
                            }
                        }
                        if chunk.is_empty() {
                            return Ok(None);
                        }
                        self.copy_ended = true;
                        return Ok(Some(chunk.freeze()));
                    }
                    b'E' => {
                        let error = parse_error_fields(&body);
                        while self.read_message().await?.0 != b'Z' {}
                        return Err(PgError::server("COPY", error));
                    }
                    b'N' | b'S' => {}
                    other => return Err(self.unexpected(other, "in COPY data")),
                }
            }
            if !chunk.is_empty() {
                return Ok(Some(chunk.freeze()));
            }
            self.fill().await?;
        }
    }

    /// Send `START_REPLICATION ...` and wait for the CopyBoth stream to open.
    pub async fn start_replication(&mut self, command: &str) -> Result<(), PgError> {
        frontend::query(command, &mut self.outbuf).map_err(|e| self.io(e))?;
        self.flush().await?;
        loop {
            let (tag, body) = self.read_message().await?;
            match tag {
                b'W' => return Ok(()),
                b'N' | b'S' => {}
                b'E' => {
                    let error = parse_error_fields(&body);
                    // The server follows the error with ReadyForQuery; consume it.
                    while self.read_message().await?.0 != b'Z' {}
                    return Err(PgError::server("START_REPLICATION", error));
                }
                other => return Err(self.unexpected(other, "in answer to START_REPLICATION")),
            }
        }
    }

    /// The next message of the replication stream, waiting for it.
    /// Cancel-safe: a message is only taken out of the buffer once it is complete.
    pub async fn recv(&mut self) -> Result<ReplicationMessage, PgError> {
        loop {
            if let Some(m) = self.try_recv_buffered()? {
                return Ok(m);
            }
            self.fill().await?;
        }
    }

    /// The next message if it is already received, without waiting.
    pub fn try_recv_buffered(&mut self) -> Result<Option<ReplicationMessage>, PgError> {
        loop {
            let Some((tag, body)) = self.take_buffered_message()? else {
                return Ok(None);
            };
            match tag {
                b'd' => return self.parse_copy_data(body).map(Some),
                // A walsender that shuts down ends with CommandComplete, without CopyDone.
                b'c' | b'C' => return Ok(Some(ReplicationMessage::CopyDone)),
                b'E' => {
                    return Err(PgError::server(
                        "replication stream",
                        parse_error_fields(&body),
                    ))
                }
                b'N' | b'S' => continue,
                other => return Err(self.unexpected(other, "in the replication stream")),
            }
        }
    }

    fn parse_copy_data(&self, mut body: Bytes) -> Result<ReplicationMessage, PgError> {
        let bad = || self.protocol("truncated replication message");
        match body.first().copied() {
            Some(b'w') if body.len() >= 25 => {
                let mut r = Reader::new(&body[1..25]);
                let wal_start = Lsn(r.u64().ok_or_else(bad)?);
                let wal_end = Lsn(r.u64().ok_or_else(bad)?);
                body.advance(25);
                Ok(ReplicationMessage::XLogData {
                    wal_start,
                    wal_end,
                    data: body,
                })
            }
            Some(b'k') if body.len() >= 18 => {
                let mut r = Reader::new(&body[1..]);
                let wal_end = Lsn(r.u64().ok_or_else(bad)?);
                let _send_time = r.i64().ok_or_else(bad)?;
                let reply_requested = r.u8().ok_or_else(bad)? != 0;
                Ok(ReplicationMessage::Keepalive {
                    wal_end,
                    reply_requested,
                })
            }
            Some(t) => Err(self.protocol(&format!(
                "unknown or truncated replication message {:?} ({} bytes)",
                t as char,
                body.len()
            ))),
            None => Err(bad()),
        }
    }

    /// Send a standby status update. `flush` is what the server may treat as confirmed.
    pub async fn send_status(
        &mut self,
        write: Lsn,
        flush: Lsn,
        apply: Lsn,
        reply_requested: bool,
    ) -> Result<(), PgError> {
        let mut msg = [0u8; 34];
        msg[0] = b'r';
        msg[1..9].copy_from_slice(&write.0.to_be_bytes());
        msg[9..17].copy_from_slice(&flush.0.to_be_bytes());
        msg[17..25].copy_from_slice(&apply.0.to_be_bytes());
        msg[25..33].copy_from_slice(&PgTimestamp::now().0.to_be_bytes());
        msg[33] = u8::from(reply_requested);
        frontend::CopyData::new(&msg[..])
            .map_err(|e| self.io(e))?
            .write(&mut self.outbuf);
        self.flush().await
    }

    /// End the stream politely: CopyDone, wait briefly for the server's end, Terminate.
    pub async fn finish(mut self) -> Result<(), PgError> {
        frontend::copy_done(&mut self.outbuf);
        self.flush().await?;
        let drain = async {
            loop {
                match self.read_message().await {
                    Ok((b'Z', _)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), drain).await;
        frontend::terminate(&mut self.outbuf);
        let _ = self.flush().await;
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), PgError> {
        let out = self.outbuf.split();
        self.stream.write_all(&out).await.map_err(|e| self.io(e))?;
        self.stream.flush().await.map_err(|e| self.io(e))
    }

    async fn fill(&mut self) -> Result<(), PgError> {
        if self.inbuf.capacity() - self.inbuf.len() < 8192 {
            self.inbuf.reserve(64 * 1024);
        }
        let n = self
            .stream
            .read_buf(&mut self.inbuf)
            .await
            .map_err(|e| self.io(e))?;
        if n == 0 {
            return Err(self.io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "server closed the connection",
            )));
        }
        Ok(())
    }

    async fn read_message(&mut self) -> Result<(u8, Bytes), PgError> {
        loop {
            if let Some(m) = self.take_buffered_message()? {
                return Ok(m);
            }
            self.fill().await?;
        }
    }

    fn take_buffered_message(&mut self) -> Result<Option<(u8, Bytes)>, PgError> {
        if self.inbuf.len() < 5 {
            return Ok(None);
        }
        let tag = self.inbuf[0];
        let len = i32::from_be_bytes([self.inbuf[1], self.inbuf[2], self.inbuf[3], self.inbuf[4]]);
        let len = usize::try_from(len)
            .ok()
            .filter(|&l| (4..=MAX_MESSAGE_LEN).contains(&l));
        let Some(len) = len else {
            return Err(self.protocol("invalid message length"));
        };
        if self.inbuf.len() < 1 + len {
            self.inbuf.reserve(1 + len - self.inbuf.len());
            return Ok(None);
        }
        let mut frame = self.inbuf.split_to(1 + len);
        frame.advance(5);
        Ok(Some((tag, frame.freeze())))
    }

    fn io(&self, source: std::io::Error) -> PgError {
        PgError::Io {
            target: self.target.clone(),
            source,
        }
    }

    fn protocol(&self, detail: &str) -> PgError {
        PgError::Protocol {
            target: self.target.clone(),
            detail: detail.to_string(),
        }
    }

    fn unexpected(&self, tag: u8, when: &str) -> PgError {
        self.protocol(&format!("unexpected message {:?} {when}", tag as char))
    }
}

fn command_name(sql: &str) -> String {
    sql.split_whitespace().next().unwrap_or("query").to_string()
}

fn parse_row_description(body: &[u8]) -> Option<Vec<String>> {
    let mut r = Reader::new(body);
    let n = r.i16()?;
    let mut cols = Vec::with_capacity(usize::try_from(n).ok()?);
    for _ in 0..n {
        cols.push(r.cstr()?.to_string());
        r.bytes(18)?; // table oid, column number, type oid, size, modifier, format
    }
    Some(cols)
}

fn parse_data_row(body: &[u8]) -> Option<Vec<Option<String>>> {
    let mut r = Reader::new(body);
    let n = r.i16()?;
    let mut row = Vec::with_capacity(usize::try_from(n).ok()?);
    for _ in 0..n {
        let len = r.i32()?;
        if len < 0 {
            row.push(None);
        } else {
            let b = r.bytes(usize::try_from(len).ok()?)?;
            row.push(Some(String::from_utf8_lossy(b).into_owned()));
        }
    }
    Some(row)
}

/// The fields of an ErrorResponse or NoticeResponse.
pub fn parse_error_fields(body: &[u8]) -> ServerError {
    let mut e = ServerError {
        severity: "ERROR".into(),
        code: "XX000".into(),
        message: String::new(),
        detail: None,
        hint: None,
    };
    let mut r = Reader::new(body);
    while let Some(kind) = r.u8() {
        if kind == 0 {
            break;
        }
        let Some(value) = r.cstr() else { break };
        match kind {
            b'V' => e.severity = value.into(),
            b'C' => e.code = value.into(),
            b'M' => e.message = value.into(),
            b'D' => e.detail = Some(value.into()),
            b'H' => e.hint = Some(value.into()),
            _ => {}
        }
    }
    if e.message.is_empty() {
        e.message = "server sent an error without a message".into();
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_fields() {
        let body = b"SERROR\0VERROR\0C42501\0Mpermission denied\0Hgrant it\0\0";
        let e = parse_error_fields(body);
        assert_eq!(e.code, "42501");
        assert_eq!(e.message, "permission denied");
        assert_eq!(e.hint.as_deref(), Some("grant it"));
        // Truncated input does not panic.
        let e = parse_error_fields(b"C4250");
        assert_eq!(e.code, "XX000");
    }

    #[test]
    fn data_rows() {
        let mut body = vec![0, 2];
        body.extend_from_slice(&3i32.to_be_bytes());
        body.extend_from_slice(b"abc");
        body.extend_from_slice(&(-1i32).to_be_bytes());
        assert_eq!(parse_data_row(&body), Some(vec![Some("abc".into()), None]));
        assert_eq!(parse_data_row(&body[..5]), None);
    }

    #[test]
    fn a_position_the_server_sends_must_parse() {
        let result = |v: Option<&str>| QueryResult {
            columns: vec!["slot_name".into(), "consistent_point".into()],
            rows: vec![vec![Some("s".into()), v.map(str::to_string)]],
        };
        let ok = result(Some("0/1A2B3C8")).lsn("CREATE_REPLICATION_SLOT", "consistent_point");
        assert_eq!(ok.unwrap(), "0/1A2B3C8".parse().unwrap());
        for bad in [Some("garbage"), Some(""), None] {
            let e = result(bad)
                .lsn("CREATE_REPLICATION_SLOT", "consistent_point")
                .unwrap_err();
            assert!(e.to_string().contains("consistent_point"), "{e}");
            assert!(!e.is_transient());
        }
        let none = QueryResult::default().lsn("CREATE_REPLICATION_SLOT", "consistent_point");
        assert!(none.is_err(), "no row at all is an error too");
    }
}

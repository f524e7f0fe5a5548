//! PostgreSQL timestamps as the replication protocol sends them: microseconds since
//! 2000-01-01 00:00:00 UTC.

use std::fmt;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

/// Microseconds between the Unix epoch and the PostgreSQL epoch (2000-01-01).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct PgTimestamp(pub i64);

impl PgTimestamp {
    pub fn now() -> Self {
        Self::from_unix_micros(Utc::now().timestamp_micros())
    }

    pub fn from_unix_micros(micros: i64) -> Self {
        PgTimestamp(micros.saturating_sub(PG_EPOCH_OFFSET_MICROS))
    }

    pub fn unix_micros(self) -> i64 {
        self.0.saturating_add(PG_EPOCH_OFFSET_MICROS)
    }

    /// Milliseconds since the Unix epoch, as Debezium's `ts_ms` wants them.
    pub fn unix_millis(self) -> i64 {
        self.unix_micros().div_euclid(1000)
    }

    pub fn to_datetime(self) -> Option<DateTime<Utc>> {
        DateTime::from_timestamp_micros(self.unix_micros())
    }
}

/// RFC 3339 in UTC with microseconds, e.g. `2026-11-21T16:20:00.123456Z`.
impl fmt::Display for PgTimestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.to_datetime() {
            Some(t) => f.write_str(&t.to_rfc3339_opts(SecondsFormat::Micros, true)),
            None => write!(f, "pg-micros:{}", self.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_is_2000() {
        assert_eq!(PgTimestamp(0).to_string(), "2000-01-01T00:00:00.000000Z");
        assert_eq!(
            PgTimestamp(1_500_000).to_string(),
            "2000-01-01T00:00:01.500000Z"
        );
        assert_eq!(PgTimestamp(0).unix_millis(), 946_684_800_000);
    }
}

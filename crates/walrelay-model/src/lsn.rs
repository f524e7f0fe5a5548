//! Write-ahead-log positions: `Lsn` (a byte offset in the WAL) and `Position` (an event's
//! place in the ordered change stream).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A log sequence number, printed the way PostgreSQL prints it: `16/B374D848`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    pub const ZERO: Lsn = Lsn(0);

    /// Bytes of WAL from `earlier` to `self`, zero if `earlier` is ahead.
    pub fn bytes_since(self, earlier: Lsn) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid LSN {0:?}: expected two hexadecimal numbers separated by '/', like 16/B374D848")]
pub struct ParseLsnError(String);

impl FromStr for Lsn {
    type Err = ParseLsnError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseLsnError(s.to_string());
        let (hi, lo) = s.split_once('/').ok_or_else(err)?;
        let hi = u32::from_str_radix(hi, 16).map_err(|_| err())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| err())?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

impl Serialize for Lsn {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.collect_str(self)
        } else {
            serializer.serialize_u64(self.0)
        }
    }
}

impl<'de> Deserialize<'de> for Lsn {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            let s = String::deserialize(deserializer)?;
            s.parse().map_err(serde::de::Error::custom)
        } else {
            u64::deserialize(deserializer).map(Lsn)
        }
    }
}

/// The place of an event in the change stream: ordered by the commit LSN of its transaction,
/// then by its sequence number inside that transaction (0 for the begin, 1.. for the changes,
/// one more than the last change for the commit). Only commit LSNs are guaranteed to increase
/// along the stream; the LSNs of individual changes are not, so they do not order events.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct Position {
    pub commit_lsn: Lsn,
    pub seq: u64,
}

impl Position {
    pub fn new(commit_lsn: Lsn, seq: u64) -> Self {
        Position { commit_lsn, seq }
    }

    /// The last position a snapshot taken at `lsn` (a slot's consistent point) holds:
    /// transactions whose commit record starts before it are in the snapshot, those from it
    /// on are streamed. Commit records start at 8-byte aligned positions, so none starts at
    /// `lsn - 1`.
    pub fn covered_by_snapshot(lsn: Lsn) -> Self {
        Position::new(Lsn(lsn.0.saturating_sub(1)), u64::MAX)
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.commit_lsn, self.seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn prints_like_postgres() {
        assert_eq!(Lsn(0x16_B374_D848).to_string(), "16/B374D848");
        assert_eq!(Lsn(0).to_string(), "0/0");
        assert_eq!("16/B374D848".parse::<Lsn>().unwrap(), Lsn(0x16_B374_D848));
        assert!("16B374D848".parse::<Lsn>().is_err());
        assert!("x/1".parse::<Lsn>().is_err());
        assert!("1/100000000".parse::<Lsn>().is_err());
    }

    #[test]
    fn positions_order_by_commit_then_seq() {
        let a = Position::new(Lsn(10), 5);
        let b = Position::new(Lsn(11), 0);
        let c = Position::new(Lsn(11), 1);
        assert!(a < b && b < c);
    }

    #[test]
    fn json_form_is_a_string() {
        assert_eq!(
            serde_json::to_string(&Lsn(0x1_0000_0002)).unwrap(),
            "\"1/2\""
        );
        let back: Lsn = serde_json::from_str("\"1/2\"").unwrap();
        assert_eq!(back, Lsn(0x1_0000_0002));
    }

    proptest! {
        #[test]
        fn display_parse_round_trip(v in any::<u64>()) {
            prop_assert_eq!(Lsn(v).to_string().parse::<Lsn>().unwrap(), Lsn(v));
        }
    }
}

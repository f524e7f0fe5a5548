//! What differs between the rows of one key range on the source and on a target, and when
//! a difference is proven rather than a change still on its way (pure: no I/O).
//!
//! A row that differs may only be in flight: changed on the source after the target's
//! read. A difference is reported once it was seen in two rounds between which the source
//! row did not change (same row version: `xmin`, `ctid`, `tableoid`; or absent both times),
//! each round reading the target only after it had applied past the source read. The
//! target's state in the first round lies between the two source reads (it holds
//! everything committed before the first and nothing committed after the second), and the
//! source row was the same all that time, so the target should have held it.

use std::collections::BTreeMap;

/// A row's key: its key columns' values as the server prints them.
pub type Key = Vec<String>;

/// A source row as the target should hold it, with the version it had when read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceRow {
    pub version: String,
    pub values: Vec<Option<String>>,
}

/// How a target row differs from the source's.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Difference {
    /// On the source, not on the target.
    Missing,
    /// On the target, not on the source.
    Extra,
    /// On both, with other values in these columns (indexes into the compared columns).
    Changed { columns: Vec<usize> },
}

/// Every key whose rows differ between `source` and `target`.
pub fn differences(
    source: &BTreeMap<Key, SourceRow>,
    target: &BTreeMap<Key, Vec<Option<String>>>,
) -> BTreeMap<Key, Difference> {
    let mut found = BTreeMap::new();
    for (key, row) in source {
        match target.get(key) {
            None => {
                found.insert(key.clone(), Difference::Missing);
            }
            Some(values) => {
                let columns: Vec<usize> = row
                    .values
                    .iter()
                    .zip(values)
                    .enumerate()
                    .filter(|(_, (a, b))| a != b)
                    .map(|(i, _)| i)
                    .collect();
                if !columns.is_empty() || row.values.len() != values.len() {
                    found.insert(key.clone(), Difference::Changed { columns });
                }
            }
        }
    }
    for key in target.keys().filter(|k| !source.contains_key(*k)) {
        found.insert(key.clone(), Difference::Extra);
    }
    found
}

/// Keys seen differing, waiting for a second round to prove them.
#[derive(Debug, Default)]
pub struct Settling {
    /// Each key's source version (`None`: no source row) when it was seen differing.
    candidates: BTreeMap<Key, Option<String>>,
    /// Keys proven already (reported once).
    proven: std::collections::BTreeSet<Key>,
    /// A round has been taken: later rounds follow its keys only.
    started: bool,
}

impl Settling {
    /// Take one round's differences, with the source rows they were found against.
    /// Returns the differences proven in this round; the keys seen differing in the first
    /// round, or whose source row changed since, wait for the next round. Keys that no
    /// longer differ are forgotten (they were in flight), and keys that differ only from
    /// the second round on are not followed: each round would otherwise find the rows
    /// inserted since, and a busy table's last range would never settle.
    pub fn round(
        &mut self,
        found: BTreeMap<Key, Difference>,
        source: &BTreeMap<Key, SourceRow>,
    ) -> Vec<(Key, Difference)> {
        let mut proven = Vec::new();
        let mut next = BTreeMap::new();
        let first = !std::mem::replace(&mut self.started, true);
        for (key, difference) in found {
            // A key that differs only in a later round was written after the first read:
            // in flight, not what this comparison is about (a later one sees it settled).
            if self.proven.contains(&key) || (!first && !self.candidates.contains_key(&key)) {
                continue;
            }
            let version = source.get(&key).map(|r| r.version.clone());
            match self.candidates.get(&key) {
                Some(before) if *before == version => {
                    self.proven.insert(key.clone());
                    proven.push((key, difference));
                }
                _ => {
                    next.insert(key, version);
                }
            }
        }
        self.candidates = next;
        proven
    }

    /// Keys still waiting for a round that proves or clears them.
    pub fn pending(&self) -> impl Iterator<Item = &Key> {
        self.candidates.keys()
    }

    pub fn is_settled(&self) -> bool {
        self.candidates.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(k: &str) -> Key {
        vec![k.to_string()]
    }

    fn src(rows: &[(&str, &str, &[Option<&str>])]) -> BTreeMap<Key, SourceRow> {
        rows.iter()
            .map(|(k, version, values)| {
                (
                    key(k),
                    SourceRow {
                        version: version.to_string(),
                        values: values.iter().map(|v| v.map(str::to_string)).collect(),
                    },
                )
            })
            .collect()
    }

    fn tgt(rows: &[(&str, &[Option<&str>])]) -> BTreeMap<Key, Vec<Option<String>>> {
        rows.iter()
            .map(|(k, values)| {
                (
                    key(k),
                    values.iter().map(|v| v.map(str::to_string)).collect(),
                )
            })
            .collect()
    }

    #[test]
    fn missing_extra_and_changed_rows_are_told_apart() {
        let source = src(&[
            ("1", "v1", &[Some("a"), None]),
            ("2", "v2", &[Some("b"), Some("x")]),
            ("3", "v3", &[Some("c"), None]),
        ]);
        let target = tgt(&[
            ("1", &[Some("a"), None]),
            ("2", &[Some("b"), None]),
            ("4", &[Some("d"), None]),
        ]);
        let found = differences(&source, &target);
        assert_eq!(
            found.into_iter().collect::<Vec<_>>(),
            vec![
                (key("2"), Difference::Changed { columns: vec![1] }),
                (key("3"), Difference::Missing),
                (key("4"), Difference::Extra),
            ]
        );
    }

    #[test]
    fn null_and_empty_text_differ() {
        let source = src(&[("1", "v", &[Some("")])]);
        let target = tgt(&[("1", &[None])]);
        assert_eq!(
            differences(&source, &target).remove(&key("1")),
            Some(Difference::Changed { columns: vec![0] })
        );
    }

    #[test]
    fn a_difference_is_proven_only_by_a_second_round_with_the_same_source_row() {
        let mut settling = Settling::default();
        let source = src(&[("1", "v1", &[Some("a")]), ("2", "v2", &[Some("b")])]);
        let first: BTreeMap<Key, Difference> = [
            (key("1"), Difference::Changed { columns: vec![0] }),
            (key("2"), Difference::Changed { columns: vec![0] }),
            (key("9"), Difference::Extra),
        ]
        .into();
        assert!(settling.round(first, &source).is_empty());
        assert_eq!(settling.pending().count(), 3);
        // Round two: row 1 unchanged and still different (proven); row 2 changed on the
        // source since (in flight: wait again); row 9 still absent from the source
        // (proven); nothing else.
        let source = src(&[("1", "v1", &[Some("a")]), ("2", "v2b", &[Some("c")])]);
        let second: BTreeMap<Key, Difference> = [
            (key("1"), Difference::Changed { columns: vec![0] }),
            (key("2"), Difference::Changed { columns: vec![0] }),
            (key("9"), Difference::Extra),
        ]
        .into();
        let proven = settling.round(second, &source);
        assert_eq!(
            proven,
            vec![
                (key("1"), Difference::Changed { columns: vec![0] }),
                (key("9"), Difference::Extra),
            ]
        );
        assert_eq!(settling.pending().collect::<Vec<_>>(), vec![&key("2")]);
        // Round three: row 2 arrived; rows 1 and 9 were reported already.
        let third: BTreeMap<Key, Difference> = [
            (key("1"), Difference::Changed { columns: vec![0] }),
            (key("9"), Difference::Extra),
        ]
        .into();
        assert!(settling.round(third, &source).is_empty());
        assert!(settling.is_settled());
    }

    #[test]
    fn keys_that_differ_only_from_the_second_round_on_are_not_followed() {
        let mut settling = Settling::default();
        let none = src(&[]);
        assert!(settling.round(BTreeMap::new(), &none).is_empty());
        assert!(settling.is_settled());
        // Rows inserted after the first read show up extra on the target now and then:
        // not followed, so the range settles.
        let later = src(&[]);
        assert!(settling
            .round([(key("7"), Difference::Extra)].into(), &later)
            .is_empty());
        assert!(settling.is_settled());
    }

    #[test]
    fn a_row_that_appears_on_the_source_between_rounds_is_not_proven_extra() {
        let mut settling = Settling::default();
        let none = src(&[]);
        settling.round([(key("5"), Difference::Extra)].into(), &none);
        // Inserted on the source meanwhile, and the target has it with other values (an
        // update still on its way): a new version, so not proven.
        let now = src(&[("5", "v5", &[Some("x")])]);
        let proven = settling.round(
            [(key("5"), Difference::Changed { columns: vec![0] })].into(),
            &now,
        );
        assert!(proven.is_empty());
        assert!(!settling.is_settled());
    }
}

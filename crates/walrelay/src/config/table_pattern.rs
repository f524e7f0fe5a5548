//! Table selectors in the configuration: `schema.table` in SQL identifier syntax, with `*`
//! for "every table" or "every schema". Unquoted names fold to lower case, as in SQL; a
//! quoted name keeps its case and may hold any character (`""` for a quote).

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NamePattern {
    Exact(String),
    Any,
}

impl NamePattern {
    /// The one name it stands for, if it is no wildcard.
    pub fn exact(&self) -> Option<&str> {
        match self {
            NamePattern::Exact(n) => Some(n),
            NamePattern::Any => None,
        }
    }

    pub fn matches(&self, name: &str) -> bool {
        match self {
            NamePattern::Exact(n) => n == name,
            NamePattern::Any => true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TablePattern {
    pub schema: NamePattern,
    pub table: NamePattern,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid table {input:?}: {reason} (write schema.table, schema.*, or quote names: '\"My Schema\".\"Odd Name\"')")]
pub struct TablePatternError {
    input: String,
    reason: String,
}

impl TablePattern {
    pub fn matches(&self, schema: &str, table: &str) -> bool {
        self.schema.matches(schema) && self.table.matches(table)
    }

    /// Names one table: no wildcard.
    pub fn is_exact(&self) -> bool {
        self.exact().is_some()
    }

    /// The (schema, table) it names, when it has no wildcard.
    pub fn exact(&self) -> Option<(&str, &str)> {
        Some((self.schema.exact()?, self.table.exact()?))
    }

    pub fn parse(input: &str) -> Result<Self, TablePatternError> {
        let err = |reason: &str| TablePatternError {
            input: input.to_string(),
            reason: reason.to_string(),
        };
        let mut parts = Vec::new();
        let mut chars = input.trim().chars().peekable();
        loop {
            let part = match chars.peek() {
                None => return Err(err("a name is missing")),
                Some('"') => {
                    chars.next();
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            None => return Err(err("unterminated quoted name")),
                            Some('"') if chars.peek() == Some(&'"') => {
                                chars.next();
                                name.push('"');
                            }
                            Some('"') => break,
                            Some(c) => name.push(c),
                        }
                    }
                    if name.is_empty() {
                        return Err(err("empty quoted name"));
                    }
                    NamePattern::Exact(name)
                }
                Some(_) => {
                    let mut name = String::new();
                    while let Some(&c) = chars.peek() {
                        if c == '.' {
                            break;
                        }
                        chars.next();
                        name.push(c);
                    }
                    if name == "*" {
                        NamePattern::Any
                    } else if name.is_empty() {
                        return Err(err("a name is missing"));
                    } else if !name
                        .chars()
                        .all(|c| c.is_alphanumeric() || c == '_' || c == '$')
                        || name.starts_with(|c: char| c.is_ascii_digit() || c == '$')
                    {
                        return Err(err(&format!("{name:?} needs double quotes to be a name")));
                    } else {
                        NamePattern::Exact(name.to_lowercase())
                    }
                }
            };
            parts.push(part);
            match chars.next() {
                None => break,
                Some('.') => continue,
                Some(c) => return Err(err(&format!("unexpected {c:?} after a quoted name"))),
            }
        }
        match parts.len() {
            1 => Ok(TablePattern {
                schema: NamePattern::Exact("public".into()),
                table: parts.remove(0),
            }),
            2 => {
                let table = parts.remove(1);
                let schema = parts.remove(0);
                Ok(TablePattern { schema, table })
            }
            _ => Err(err("too many dots: the form is schema.table")),
        }
    }
}

impl fmt::Display for TablePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let part = |p: &NamePattern| match p {
            NamePattern::Exact(n) => walrelay_model::display_ident(n).into_owned(),
            NamePattern::Any => "*".to_string(),
        };
        write!(f, "{}.{}", part(&self.schema), part(&self.table))
    }
}

impl Serialize for TablePattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for TablePattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        TablePattern::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exact(s: &str) -> NamePattern {
        NamePattern::Exact(s.into())
    }

    #[test]
    fn forms() {
        let p = TablePattern::parse("public.orders").unwrap();
        assert_eq!((p.schema, p.table), (exact("public"), exact("orders")));
        let p = TablePattern::parse("Sales.*").unwrap();
        assert_eq!((p.schema, p.table), (exact("sales"), NamePattern::Any));
        let p = TablePattern::parse(r#""My Schema"."Odd ""Name""""#).unwrap();
        assert_eq!(
            (p.schema, p.table),
            (exact("My Schema"), exact("Odd \"Name\""))
        );
        let p = TablePattern::parse("orders").unwrap();
        assert_eq!((p.schema, p.table), (exact("public"), exact("orders")));
        let p = TablePattern::parse("\"a.b\".c").unwrap();
        assert_eq!((p.schema, p.table), (exact("a.b"), exact("c")));
        let p = TablePattern::parse("*.*").unwrap();
        assert!(p.matches("x", "y"));
    }

    #[test]
    fn display_round_trips() {
        for s in [
            r#""My Schema"."Odd ""Name""""#,
            "\"public\".*",
            "*.*",
            "\"*\".x",
        ] {
            let p = TablePattern::parse(s).unwrap();
            assert_eq!(TablePattern::parse(&p.to_string()).unwrap(), p);
        }
    }

    #[test]
    fn errors() {
        for bad in [
            "", "a.", ".b", "a.b.c", "\"open", "my table", "1abc", "\"\".x", "\"a\"b",
        ] {
            assert!(
                TablePattern::parse(bad).is_err(),
                "{bad:?} should be rejected"
            );
        }
    }
}

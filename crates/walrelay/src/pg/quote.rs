//! Quoting for the few places SQL text must carry a name or a literal: identifiers are always
//! double-quoted, literals single-quoted. Values in ordinary SQL are bound as parameters
//! instead; these are for replication commands and DDL, which take no parameters.

/// `"name"` with embedded double quotes doubled. Always quoted, so case and odd characters
/// survive exactly.
pub fn ident(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 2);
    out.push('"');
    for c in name.chars() {
        if c == '"' {
            out.push('"');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// `"schema"."name"`.
pub fn qualified(schema: &str, name: &str) -> String {
    format!("{}.{}", ident(schema), ident(name))
}

/// `'text'` with embedded single quotes doubled. Backslashes are literal because
/// `standard_conforming_strings` is on (the default since PostgreSQL 9.1, and walrelay checks
/// it before relying on this).
pub fn literal(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('\'');
    for c in text.chars() {
        if c == '\'' {
            out.push('\'');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(
            ident("a\"; drop table x; --"),
            "\"a\"\"; drop table x; --\""
        );
        assert_eq!(qualified("My Schema", "t"), "\"My Schema\".\"t\"");
        assert_eq!(literal("it's"), "'it''s'");
        assert_eq!(literal("back\\slash"), "'back\\slash'");
    }
}

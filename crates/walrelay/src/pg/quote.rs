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

/// A string constant for SQL: `'text'` with embedded single quotes doubled, and with a
/// backslash in it `E'...'` with backslashes doubled too — as PostgreSQL's `quote_literal`
/// does, so that it reads the same whatever `standard_conforming_strings` the server or
/// session has.
pub fn literal(text: &str) -> String {
    if text.contains('\\') {
        format!("E{}", standard_literal(&text.replace('\\', "\\\\")))
    } else {
        standard_literal(text)
    }
}

/// `'text'` with quotes doubled and backslashes as they are: what replication commands
/// (`START_REPLICATION ... (publication_names ...)`) take — their grammar has no `E''` —
/// and how PostgreSQL prints a constant in a definition (`pg_get_expr`) under
/// `standard_conforming_strings = on` (the default).
pub fn standard_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
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
        assert_eq!(literal("back\\slash"), "E'back\\\\slash'");
        assert_eq!(standard_literal("\"it's\\\""), "'\"it''s\\\"'");
    }
}

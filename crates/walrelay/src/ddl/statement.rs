//! Just enough of SQL's lexical rules to cut a query string into statements and find its
//! words: quoted identifiers, strings (with `E''` escapes), dollar quoting and comments
//! (nested `/* */`) never hold a statement's end or a keyword. No parser: walrelay replays
//! the source's text, it does not rewrite it, except to drop `CONCURRENTLY` (which cannot
//! run inside the apply transaction).

/// A word outside quotes and comments, by byte range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Word {
    start: usize,
    end: usize,
}

/// What the lexer found: the top-level `;` positions and the bare words.
struct Scan {
    semicolons: Vec<usize>,
    words: Vec<Word>,
}

fn scan(sql: &str) -> Scan {
    let b = sql.as_bytes();
    let mut out = Scan {
        semicolons: Vec::new(),
        words: Vec::new(),
    };
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let mut depth = 0;
                while i < b.len() {
                    if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                        depth += 1;
                        i += 2;
                    } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
            }
            b'\'' => i = skip_string(b, i, false),
            b'"' => {
                i += 1;
                while i < b.len() {
                    if b[i] == b'"' {
                        if b.get(i + 1) == Some(&b'"') {
                            i += 2;
                            continue;
                        }
                        break;
                    }
                    i += 1;
                }
                i += 1;
            }
            b'$' => {
                // `$tag$ ... $tag$`; a `$1` parameter or a `$` inside a word is not one.
                let tag_end = b[i + 1..]
                    .iter()
                    .position(|&x| !(x.is_ascii_alphanumeric() || x == b'_' || x >= 0x80))
                    .map(|p| i + 1 + p);
                match tag_end {
                    Some(e) if b[e] == b'$' && !b.get(i + 1).is_some_and(u8::is_ascii_digit) => {
                        let tag = &b[i..=e];
                        let body = e + 1;
                        i = find(b, body, tag).map_or(b.len(), |p| p + tag.len());
                    }
                    _ => i += 1,
                }
            }
            b';' => {
                out.semicolons.push(i);
                i += 1;
            }
            c if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 => {
                let start = i;
                while i < b.len()
                    && (b[i].is_ascii_alphanumeric()
                        || b[i] == b'_'
                        || b[i] == b'$'
                        || b[i] >= 0x80)
                {
                    i += 1;
                }
                // `E'...'`: a string with backslash escapes.
                if i - start == 1 && (c == b'E' || c == b'e') && b.get(i) == Some(&b'\'') {
                    i = skip_string(b, i, true);
                    continue;
                }
                out.words.push(Word { start, end: i });
            }
            _ => i += 1,
        }
    }
    out
}

/// Past the string that opens at `i`.
fn skip_string(b: &[u8], mut i: usize, backslashes: bool) -> usize {
    i += 1;
    while i < b.len() {
        match b[i] {
            b'\\' if backslashes => i += 2,
            b'\'' if b.get(i + 1) == Some(&b'\'') => i += 2,
            b'\'' => return i + 1,
            _ => i += 1,
        }
    }
    b.len()
}

fn find(hay: &[u8], from: usize, needle: &[u8]) -> Option<usize> {
    hay.get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| from + p)
}

/// The statements of a query string that hold a word (empty ones and bare comments left
/// out), trimmed.
pub fn statements(sql: &str) -> Vec<&str> {
    let s = scan(sql);
    let mut out = Vec::new();
    let mut start = 0;
    let ends = s
        .semicolons
        .iter()
        .copied()
        .chain(std::iter::once(sql.len()));
    for end in ends {
        let has_word = s.words.iter().any(|w| w.start >= start && w.end <= end);
        if has_word {
            out.push(sql[start..end].trim());
        }
        start = end + 1;
    }
    out
}

/// The first word, upper-cased.
pub fn first_word(sql: &str) -> Option<String> {
    scan(sql)
        .words
        .first()
        .map(|w| sql[w.start..w.end].to_ascii_uppercase())
}

/// `sql` without its first bare `CONCURRENTLY` (`CREATE INDEX CONCURRENTLY`, `DROP INDEX
/// CONCURRENTLY`, `REINDEX ... CONCURRENTLY`).
pub fn without_concurrently(sql: &str) -> String {
    let s = scan(sql);
    match s
        .words
        .iter()
        .find(|w| sql[w.start..w.end].eq_ignore_ascii_case("CONCURRENTLY"))
    {
        Some(w) => format!("{}{}", &sql[..w.start], sql[w.end..].trim_start()),
        None => sql.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_split_only_at_top_level_semicolons() {
        let sql = "ALTER TABLE \"a;b\" ADD c text DEFAULT 'x;y'; -- c;\n /* d; /* e; */ */ ;
                   CREATE FUNCTION f() RETURNS int AS $body$ SELECT 1; $body$ LANGUAGE sql;
                   COMMENT ON TABLE t IS E'it''s \\'; still';";
        let got = statements(sql);
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(got[0].starts_with("ALTER TABLE \"a;b\""));
        assert!(got[1].starts_with("CREATE FUNCTION"));
        assert!(got[2].ends_with("still'"));
    }

    #[test]
    fn a_single_statement_with_its_semicolon_and_comments_is_one() {
        assert_eq!(
            statements("  -- why\n  ALTER TABLE t ADD b int ;  /* done */ "),
            vec!["-- why\n  ALTER TABLE t ADD b int"]
        );
        assert_eq!(first_word("-- x\n alter table t"), Some("ALTER".into()));
        assert_eq!(first_word("/* a */ DO $$ BEGIN END $$"), Some("DO".into()));
    }

    #[test]
    fn concurrently_goes_only_where_it_is_a_word() {
        assert_eq!(
            without_concurrently("CREATE INDEX CONCURRENTLY \"concurrently\" ON t (a)"),
            "CREATE INDEX \"concurrently\" ON t (a)"
        );
        assert_eq!(
            without_concurrently("drop index concurrently if exists i"),
            "drop index if exists i"
        );
        assert_eq!(
            without_concurrently("CREATE INDEX i ON t (a)"),
            "CREATE INDEX i ON t (a)"
        );
    }

    #[test]
    fn parameters_and_dollar_words_are_not_quotes() {
        assert_eq!(statements("SELECT $1; SELECT a$b$c").len(), 2);
    }
}

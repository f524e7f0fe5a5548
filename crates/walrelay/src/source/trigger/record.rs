//! The text form of a row (`record_out`: `(1,"a b",,"x""y")`) split into its fields, each
//! in its type's own text output, as the log's triggers write rows (`new_row::text`).
//!
//! Written here rather than taken from a crate: the format is small and fixed (PostgreSQL's
//! `record_in` rules), and this is the capture's hot path.

use walrelay_model::Value;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed row text at byte {at}: {what}")]
pub struct RecordError {
    pub at: usize,
    pub what: &'static str,
}

/// The fields of a row's text form: `None` for NULL (an empty, unquoted field), otherwise
/// the value with quotes and escapes removed.
pub fn parse(text: &str) -> Result<Vec<Option<String>>, RecordError> {
    let bytes = text.as_bytes();
    let err = |at, what| RecordError { at, what };
    if bytes.first() != Some(&b'(') {
        return Err(err(0, "expected '('"));
    }
    let mut fields = Vec::new();
    let mut i = 1;
    // `()` is one NULL field (a row of no columns prints the same; none is captured).
    loop {
        let mut value = String::new();
        let mut present = false;
        let mut quoted = false;
        let mut run_start = i;
        loop {
            let Some(&c) = bytes.get(i) else {
                return Err(err(i, "unexpected end"));
            };
            match c {
                b'"' => {
                    value.push_str(&text[run_start..i]);
                    present = true;
                    quoted = !quoted;
                    // `""` inside quotes is one quote.
                    if !quoted && bytes.get(i + 1) == Some(&b'"') {
                        value.push('"');
                        quoted = true;
                        i += 1;
                    }
                    i += 1;
                    run_start = i;
                }
                b'\\' => {
                    value.push_str(&text[run_start..i]);
                    present = true;
                    let next = text[i + 1..]
                        .chars()
                        .next()
                        .ok_or_else(|| err(i, "backslash at the end"))?;
                    value.push(next);
                    i += 1 + next.len_utf8();
                    run_start = i;
                }
                b',' | b')' if !quoted => {
                    if i > run_start {
                        value.push_str(&text[run_start..i]);
                        present = true;
                    }
                    break;
                }
                _ => i += 1,
            }
        }
        fields.push(present.then_some(value));
        if bytes[i] == b')' {
            if i + 1 != bytes.len() {
                return Err(err(i + 1, "text after ')'"));
            }
            return Ok(fields);
        }
        i += 1;
    }
}

/// A field as a row value.
pub fn value(field: Option<String>) -> Value {
    field.map_or(Value::Null, Value::Text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(text: &str) -> Vec<Option<&str>> {
        // Leak for the test's convenience: compare as &str.
        parse(text)
            .unwrap()
            .into_iter()
            .map(|f| f.map(|s| &*Box::leak(s.into_boxed_str())))
            .collect()
    }

    #[test]
    fn fields_as_record_out_writes_them() {
        assert_eq!(fields("(1,abc)"), [Some("1"), Some("abc")]);
        assert_eq!(fields("(1,,3)"), [Some("1"), None, Some("3")]);
        assert_eq!(fields("(,)"), [None, None]);
        assert_eq!(fields("(\"\")"), [Some("")]);
        assert_eq!(fields("(\"a b\",\"x\"\"y\")"), [Some("a b"), Some("x\"y")]);
        assert_eq!(fields("(\"a\\\\b\")"), [Some("a\\b")]);
        assert_eq!(
            fields("(\"(1,2)\",\"{a,b}\")"),
            [Some("(1,2)"), Some("{a,b}")]
        );
        assert_eq!(fields("(\"é, ü\")"), [Some("é, ü")]);
        assert_eq!(fields("()"), [None]);
        // record_in also takes escapes and quotes inside an unquoted field.
        assert_eq!(fields("(a\\,b,c\"d\"e)"), [Some("a,b"), Some("cde")]);
    }

    #[test]
    fn malformed_text_is_an_error_not_a_guess() {
        for bad in ["", "1,2", "(1,2", "(\"a)", "(1)x", "(a\\"] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}

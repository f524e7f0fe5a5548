//! COPY's text format, both ways: rows as PostgreSQL writes them (`COPY ... TO STDOUT`)
//! read into values, and values written for `COPY ... FROM STDIN`.

use walrelay_model::{Row, Value};

/// A value in COPY's text format: `\N` for NULL, backslash, tab, newline and carriage
/// return escaped; everything else as PostgreSQL printed it.
pub fn encode_value(v: &Value, out: &mut Vec<u8>) {
    let text = match v {
        Value::Null | Value::UnchangedToast => {
            out.extend_from_slice(b"\\N");
            return;
        }
        Value::Text(t) => t.as_bytes(),
        Value::Binary(b) => b.as_slice(),
    };
    for &b in text {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            _ => out.push(b),
        }
    }
}

/// One row of COPY text format: tab-separated, `\N` for NULL, backslash escapes.
pub fn parse_row(line: &[u8], columns: usize) -> Result<Row, String> {
    let mut values = Vec::with_capacity(columns);
    for field in line.split(|&b| b == b'\t') {
        if field == b"\\N" {
            values.push(Value::Null);
            continue;
        }
        let mut out = Vec::with_capacity(field.len());
        let mut bytes = field.iter().copied();
        while let Some(b) = bytes.next() {
            if b != b'\\' {
                out.push(b);
                continue;
            }
            // COPY TO writes only these escapes (and octal never, for valid text).
            match bytes.next() {
                Some(b'b') => out.push(8),
                Some(b'f') => out.push(12),
                Some(b'n') => out.push(b'\n'),
                Some(b'r') => out.push(b'\r'),
                Some(b't') => out.push(b'\t'),
                Some(b'v') => out.push(11),
                Some(other) => out.push(other),
                None => return Err("a COPY row ends in a lone backslash".into()),
            }
        }
        let text = String::from_utf8(out).map_err(|_| "a COPY value is not UTF-8".to_string())?;
        values.push(Value::Text(text));
    }
    if values.len() != columns {
        return Err(format!(
            "a COPY row has {} values for {columns} columns",
            values.len()
        ));
    }
    Ok(Row(values))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_escapes() {
        let mut out = Vec::new();
        encode_value(&Value::Text("a\tb\\c\nd\re".into()), &mut out);
        assert_eq!(out, b"a\\tb\\\\c\\nd\\re");
        out.clear();
        encode_value(&Value::Null, &mut out);
        assert_eq!(out, b"\\N");
        out.clear();
        encode_value(&Value::Text("\\N".into()), &mut out);
        assert_eq!(out, b"\\\\N", "a text that reads \\N is not NULL");
    }

    #[test]
    fn copy_text_rows_unescape_as_postgres_writes_them() {
        let row = parse_row(b"1\t\\N\ta\\tb\\\\c\\nd\t", 4).unwrap();
        assert_eq!(
            row.0,
            vec![
                Value::Text("1".into()),
                Value::Null,
                Value::Text("a\tb\\c\nd".into()),
                Value::Text(String::new()),
            ]
        );
        assert!(parse_row(b"1\t2", 3).is_err(), "a short row is an error");
        assert!(parse_row(b"1\\", 1).is_err());
    }
}

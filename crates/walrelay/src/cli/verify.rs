//! `walrelay verify`: print what `verify` found, per table, and exit 0 (equal), 1
//! (differences left) or 2 (could not compare everything).

use std::process::ExitCode;
use std::time::Duration;

use crate::config::{Config, TablePattern};
use crate::verify::{self, Difference, Options, TableReport};

#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    #[arg(long, short)]
    pub config: std::path::PathBuf,
    /// Only this table (source or target name, `schema.table`, patterns allowed); repeat
    /// for more.
    #[arg(long)]
    pub table: Vec<String>,
    /// Rows per compared key range.
    #[arg(long, default_value_t = 10_000)]
    pub chunk_rows: usize,
    /// Key ranges compared at the same time, each with a session on the source and on
    /// the target.
    #[arg(long, default_value_t = 4)]
    pub jobs: usize,
    /// Most source rows read per second, all jobs together (default: unbounded).
    #[arg(long)]
    pub rate: Option<u64>,
    /// Longest wait for a target to apply past a source read before a range is reported
    /// unsettled.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub wait: Duration,
    /// Put right every difference found (see docs/operations.md).
    #[arg(long)]
    pub repair: bool,
    /// One JSON document on standard output instead of text.
    #[arg(long)]
    pub json: bool,
}

pub async fn verify(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load(&args.config)?;
    let mut tables = Vec::new();
    for t in &args.table {
        tables.push(TablePattern::parse(t).map_err(|e| anyhow::anyhow!("--table: {e}"))?);
    }
    if args.chunk_rows == 0 {
        anyhow::bail!("--chunk-rows must be at least 1");
    }
    let options = Options {
        tables,
        chunk_rows: args.chunk_rows,
        rate: args.rate,
        wait: args.wait,
        jobs: args.jobs,
        ranges: None,
        repair: args.repair,
    };
    let json = args.json;
    let result = verify::verify(&config, &options, |r| {
        if !json {
            print_table(r);
        }
    })
    .await;
    let reports = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("verify could not run: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let code = exit_code(&reports);
    if json {
        let doc = serde_json::json!({
            "equal": code == 0,
            "tables": reports,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        let rows: u64 = reports.iter().map(|r| r.rows).sum();
        let open: usize = reports.iter().map(TableReport::open_differences).sum();
        let repaired: usize = reports
            .iter()
            .map(|r| r.differences.iter().filter(|f| f.repaired()).count())
            .sum();
        println!(
            "{} tables, {rows} rows: {}",
            reports.len(),
            match code {
                0 if repaired > 0 => format!("equal after {repaired} repairs"),
                0 => "equal".into(),
                1 => format!("{open} differences"),
                _ => "not everything could be compared".into(),
            }
        );
    }
    Ok(ExitCode::from(code))
}

/// 1 while a difference is left; else 2 when something was not compared; else 0.
fn exit_code(reports: &[TableReport]) -> u8 {
    if reports.iter().any(|r| r.open_differences() > 0) {
        1
    } else if reports
        .iter()
        .any(|r| !r.unsettled.is_empty() || r.not_compared.is_some())
    {
        2
    } else {
        0
    }
}

fn print_table(r: &TableReport) {
    let name = if r.table == r.target {
        r.table.clone()
    } else {
        format!("{} -> {}", r.table, r.target)
    };
    if let Some(why) = &r.not_compared {
        println!("sink {}: {name}: not compared: {why}", r.sink);
        return;
    }
    println!(
        "sink {}: {name}: {} rows, {} ranges, {} differences ({:.1} s)",
        r.sink,
        r.rows,
        r.chunks,
        r.differences.len(),
        r.seconds
    );
    for f in &r.differences {
        let what = match &f.difference {
            Difference::Missing => "missing on the target".to_string(),
            Difference::Extra => "extra on the target".to_string(),
            Difference::Changed { .. } => format!("differs in {}", f.column_names.join(", ")),
        };
        let repair = f
            .repair
            .as_ref()
            .map(|r| format!(" -> {r}"))
            .unwrap_or_default();
        println!(
            "  ({}) = ({}): {what}{repair}",
            r.key_columns.join(", "),
            f.key.join(", ")
        );
    }
    for u in &r.unsettled {
        println!("  unsettled: {u}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::{Found, Repair};

    #[test]
    fn differences_outrank_what_could_not_be_compared() {
        let equal = TableReport::default();
        let unsettled = TableReport {
            unsettled: vec!["x".into()],
            ..TableReport::default()
        };
        let found = |repair: Option<Repair>| TableReport {
            differences: vec![Found {
                key: vec!["1".into()],
                difference: Difference::Missing,
                column_names: vec![],
                repair,
            }],
            ..TableReport::default()
        };
        assert_eq!(exit_code(std::slice::from_ref(&equal)), 0);
        assert_eq!(exit_code(&[equal.clone(), unsettled.clone()]), 2);
        assert_eq!(exit_code(&[unsettled.clone(), found(None)]), 1);
        assert_eq!(exit_code(&[found(Some(Repair::Inserted))]), 0);
        assert_eq!(
            exit_code(&[found(Some(Repair::Skipped(
                "the source row changed meanwhile"
            )))]),
            1
        );
        let missing = TableReport {
            missing_table: true,
            not_compared: Some("the target has no table".into()),
            ..TableReport::default()
        };
        assert_eq!(exit_code(&[missing]), 1);
    }
}

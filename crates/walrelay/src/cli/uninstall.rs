//! `walrelay uninstall`: remove from the source what trigger capture installed there (the
//! triggers on the captured tables, their functions, the schema `walrelay_capture`), and
//! nothing else. Refused while a relay captures from it.

use std::process::ExitCode;

use crate::config::Config;
use crate::pg::sql;
use crate::source::trigger::install;

pub async fn uninstall(config: &Config) -> anyhow::Result<ExitCode> {
    let info = crate::pg::locate::locate(&config.source.url.resolve()?).await?;
    let mut client = sql::connect(&info).await?;
    match install::uninstall(&mut client).await? {
        install::Removed::Nothing => {
            println!("nothing to remove: {} has no trigger capture", info.describe());
        }
        install::Removed::Tables(n) => println!(
            "removed trigger capture from {}: the triggers of {n} table(s), their functions and the schema walrelay_capture with its log",
            info.describe()
        ),
    }
    Ok(ExitCode::SUCCESS)
}

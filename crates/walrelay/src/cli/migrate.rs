//! `walrelay migrate`, `cutover` and `rollback`.

use std::process::ExitCode;
use std::time::Duration;

use crate::config::Config;
use crate::migrate::{self, Outcome};

pub async fn migrate(config: &Config) -> anyhow::Result<ExitCode> {
    let cancel = super::run::cancel_on_signal()?;
    migrate::migrate(config, cancel).await?;
    Ok(ExitCode::SUCCESS)
}

/// Ask for a cutover or rollback and wait for it; print the write pause.
pub async fn switch(config: &Config, cutover: bool, timeout: Duration) -> anyhow::Result<ExitCode> {
    let what = if cutover { "cutover" } else { "rollback" };
    match migrate::ask(config, cutover, timeout).await {
        Ok(Outcome::Done(pause)) => {
            println!("{what} done: write pause {pause:.2} s (from the fence on the old side to the new side taking writes)");
            Ok(ExitCode::SUCCESS)
        }
        Ok(Outcome::CalledOff(why)) => {
            eprintln!("{why}");
            Ok(ExitCode::from(1))
        }
        Err(e) => {
            eprintln!("walrelay {what}: {e}");
            Ok(ExitCode::from(1))
        }
    }
}

//! `walrelay consume`: apply a RabbitMQ queue to a PostgreSQL target, until a signal.
//! Once consuming has begun, a lost broker or target is waited for (backoff to 30 s); a
//! failure before that is most likely configuration, and is reported at once.

use std::process::ExitCode;
use std::time::Duration;

use crate::amqp::consume;
use crate::config::ConsumeConfig;

pub async fn consume(config: &ConsumeConfig) -> anyhow::Result<ExitCode> {
    let cancel = super::run::cancel_on_signal()?;
    let mut started = false;
    let mut backoff = Duration::from_millis(500);
    loop {
        match consume::consume(config, cancel.clone(), &mut started).await {
            Ok(messages) => {
                tracing::info!(messages, "stopped cleanly");
                return Ok(ExitCode::SUCCESS);
            }
            Err(e) if started && e.is_transient() && !cancel.is_cancelled() => {
                tracing::warn!(error = %e, retry_in = ?backoff, "consumer interrupted; reconnecting");
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(ExitCode::SUCCESS),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

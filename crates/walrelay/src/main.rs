//! The `walrelay` command: parse arguments, set up logging and the runtime, dispatch.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = walrelay::cli::Cli::parse();
    walrelay::cli::init_logging(&cli);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("walrelay")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("walrelay: error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(walrelay::cli::dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            // One line, whatever the inner messages hold; a cause the message already
            // quotes is not repeated.
            let message = walrelay::pg::error::error_chain(e.as_ref()).replace('\n', " ");
            eprintln!("walrelay: error: {message}");
            ExitCode::FAILURE
        }
    }
}

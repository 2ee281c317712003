//! The `fedgate` binary: parse the command line, hand over to `fedgate::cli`.

use std::process::ExitCode;

fn main() -> ExitCode {
    match fedgate::cli::parse_args() {
        Ok(cli) => fedgate::cli::main_with(cli, |cfg| {
            fedgate::app::run_from_config(cfg, fedgate::metrics::install())
        }),
        Err(code) => code,
    }
}

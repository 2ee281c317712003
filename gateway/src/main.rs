//! The `fedgate` binary: parse the command line, hand over to `fedgate::cli`.

use std::process::ExitCode;

fn main() -> ExitCode {
    match fedgate::cli::parse_args() {
        Ok(cli) => fedgate::cli::main_with(cli, fedgate::app::run_from_config),
        Err(code) => code,
    }
}

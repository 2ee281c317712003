//! The `fedgate` binary: parse the command line, hand over to `fedgate::cli`.

use std::process::ExitCode;

/// jemalloc, with its background purging threads: memory freed after a large change (20 000
/// services withdrawn) goes back to the system within seconds. glibc's malloc kept it: a
/// gateway stayed at 582 MB after the withdrawal, 72 MB with jemalloc
/// (`bench/propagation.py --bulk`, docs/benchmarks.md).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    match fedgate::cli::parse_args() {
        Ok(cli) => fedgate::cli::main_with(cli, |cfg| {
            fedgate::app::run_from_config(cfg, fedgate::metrics::install())
        }),
        Err(code) => code,
    }
}

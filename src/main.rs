//! The `meshcanary` binary: parse the command line, start logging, run the command.

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    let cli = meshcanary::cli::Cli::parse();
    meshcanary::cli::init_logging(&cli.log_format, &cli.log_level);
    match meshcanary::cli::run(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("meshcanary: {error:#}");
            ExitCode::from(2)
        }
    }
}

//! The `meshcanary` binary: parse the command line, start logging, run the command.

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    one_malloc_arena();
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

/// glibc gives each thread that contends for the heap its own arena (up to 8 per core), and
/// memory freed in one arena is not reused by another. The agent has two runtime workers
/// that hand scrape bodies and batches to each other, so one arena is enough and saves
/// about 3.5 MB of peak RSS under the 30-target bench (`scripts/bench-peers.sh`: 32.6 MB
/// against 36.2 MB), with no measurable CPU cost. The environment's `MALLOC_ARENA_MAX`
/// still wins if set.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn one_malloc_arena() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only changes allocator settings; it is called before any other
        // thread exists, and M_ARENA_MAX is a documented glibc parameter.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn one_malloc_arena() {}

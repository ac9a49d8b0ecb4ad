//! The `meshcanary` binary: parse the command line, start logging, run the command.

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    tune_malloc();
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

/// glibc's malloc, tuned for a process that turns over ~5 MB/s of scrape bodies and
/// batches (measured with `scripts/bench-peers.sh`, 30 targets x 160 KB every second):
/// - one arena: glibc gives each contending thread its own (up to 8 per core), and memory
///   freed in one is not reused by another; the runtime's worker and the blocking pool hand
///   bodies and batches to each other, so one is enough: about 3.5 MB less peak RSS, no
///   measurable CPU;
/// - fixed mmap (4 MiB) and trim (8 MiB) thresholds: by default every 160 KB body or batch
///   buffer freed at the top of the heap is returned to the kernel and faulted back in at
///   the next scrape; kept, system CPU falls from about 0.026 to 0.015 cores, for under
///   1 MB more peak RSS.
///
/// The environment's `MALLOC_ARENA_MAX`, `MALLOC_MMAP_THRESHOLD_` and
/// `MALLOC_TRIM_THRESHOLD_` still win if set.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_malloc() {
    let settings = [
        ("MALLOC_ARENA_MAX", libc::M_ARENA_MAX, 1),
        ("MALLOC_MMAP_THRESHOLD_", libc::M_MMAP_THRESHOLD, 4 << 20),
        ("MALLOC_TRIM_THRESHOLD_", libc::M_TRIM_THRESHOLD, 8 << 20),
    ];
    for (env, param, value) in settings {
        if std::env::var_os(env).is_none() {
            // SAFETY: mallopt only changes allocator settings; it runs before any other
            // thread exists, and these are documented glibc parameters.
            unsafe {
                libc::mallopt(param, value);
            }
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_malloc() {}

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    gatewarden::logging::init();
    gatewarden::cli::main(gatewarden::cli::Cli::parse())
}

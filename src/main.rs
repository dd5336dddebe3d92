//! The `arca` binary: the server and the admin CLI in one.

#![forbid(unsafe_code)]

// mimalloc: the gRPC stack allocates and frees small buffers on every request; measured
// with scripts/bench, glibc malloc/free took ~15% of the server's CPU at 64 callers.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    arca::cli::main()
}

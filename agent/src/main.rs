//! The `agent` binary: all logic lives in the library; see `cli`.

fn main() -> std::process::ExitCode {
    homelab_agent::cli::main()
}

//! `keyward`: the control plane's CLI and server. See `keyward --help`.

fn main() -> std::process::ExitCode {
    keyward_control::cli::main()
}

//! Compiles `proto/` with protox (pure Rust, no `protoc` needed) and generates the tonic
//! client and server of the export exchange.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/fedgate/exchange/v1/exchange.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(fds)?;
    Ok(())
}

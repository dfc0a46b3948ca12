//! Generates Rust code for `proto/tandem/v1` with a vendored `protoc`, so a build needs no system
//! protobuf compiler.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);

    // Read at run time, not baked in when the build script is compiled: a build script binary
    // may be reused for another checkout of the same package.
    let proto_root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let files = [
        "common",
        "terms",
        "operator",
        "gateway",
        "partnerships",
        "ledger",
        "events",
        "ledger_events",
        "ledger_topic",
        "settlement",
        "settlement_topic",
        "notifications",
    ]
    .map(|name| proto_root.join(format!("tandem/v1/{name}.proto")));
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);

    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("tandem_v1_descriptor.bin"))
        .compile_protos(&files, std::slice::from_ref(&proto_root))?;
    println!("cargo:rerun-if-changed={}", proto_root.display());
    Ok(())
}

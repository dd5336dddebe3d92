//! Generates the gRPC code from proto/ into OUT_DIR.
//!
//! Messages that carry key material are built without `Debug` (`skip_debug`), so no
//! `{:?}` anywhere can print a data key; the crate implements a redacting `Debug` for them.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/arca/v1/keys.proto",
        "proto/arca/v1/quorum.proto",
        "proto/arca/v1/types.proto",
        "proto/arca/v1/access.proto",
        "proto/arca/v1/audit.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("arca_descriptor.bin"))
        .skip_debug([
            "arca.v1.GenerateDataKeyResponse",
            "arca.v1.WrapKeyRequest",
            "arca.v1.UnwrapKeyResponse",
            "arca.v1.InitRequest",
            "arca.v1.CustodianKit",
            "arca.v1.UnsealRequest",
            "arca.v1.ApproveRequest",
            "arca.v1.CreateTokenResponse",
            "arca.v1.EnrollTotpResponse",
        ])
        .compile_protos(&protos, &["proto"])?;
    Ok(())
}

//! Generates the gRPC code of KubeVirt's hook and plugin protocols from `proto/` (protox compiles them,
//! so no system protoc is needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/info.proto",
        "proto/v1alpha1.proto",
        "proto/v1alpha2.proto",
        "proto/v1alpha3.proto",
        "proto/plugins_v1alpha1.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}

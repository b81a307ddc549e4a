//! Generates the services API's gRPC code from `proto/services_v1.proto` (protox compiles it, so no
//! system protoc is needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/services_v1.proto"];
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

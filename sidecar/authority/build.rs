//! Generates the etcd v3 client from `proto/etcd_v3.proto` (protox compiles it, so no system protoc is
//! needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/etcd_v3.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .compile_fds(fds)?;
    Ok(())
}

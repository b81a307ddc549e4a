//! Prints a domain XML file with the monitor added: `cargo run --example mutate -- FILE [QMP_PATH]`.
fn main() {
    let a: Vec<String> = std::env::args().collect();
    let xml = std::fs::read(&a[1]).expect("the domain XML file");
    let qmp = a.get(2).map_or(
        "/var/run/kubevirt-hooks/hook-sidecar-0/endophyte/qmp.sock",
        |s| s,
    );
    match endophyte_kubevirt_hooks::domain::add_monitor(&xml, qmp) {
        Ok(m) => print!("{}", String::from_utf8_lossy(&m.xml)),
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    }
}

//! The example key-value service (`examples/kv-service`, run as `endophyte example-kv`) in tests.

use std::path::Path;

use endophyte_demo::kv::store::{read_log, Event, State};

use super::{wait_path, Proc};

/// `endophyte example-kv` on the node's services socket `svc` (waited for), with `extra` flags.
pub fn kv(svc: &Path, extra: &[&str]) -> Proc {
    wait_path(svc);
    let svc = format!("--services={}", svc.display());
    Proc::spawn("kv", &[&["example-kv", svc.as_str()], extra].concat())
}

/// What the service contributed to `epoch`, from its `--log`.
pub fn contributed(log: &Path, epoch: u64) -> State {
    read_log(log)
        .unwrap()
        .into_iter()
        .find_map(|e| match e {
            Event::Contributed {
                epoch: e, state, ..
            } if e == epoch => Some(state),
            _ => None,
        })
        .unwrap_or_else(|| panic!("the service contributed nothing to epoch {epoch}"))
}

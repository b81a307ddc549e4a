//! The service's session with its node, and its own API socket.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use endophyte_engine::services::grpc::connect;
use endophyte_engine::services::pb;
use pb::node_message::Msg as NodeMsg;
use pb::service_message::Msg;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::store::{Event, Log, State};
use crate::Opts;

type Shared<T> = Arc<Mutex<T>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn hook(name: &str) -> anyhow::Result<pb::Hook> {
    match name {
        "epoch" => Ok(pb::Hook::Epoch),
        "migration" => Ok(pb::Hook::Migration),
        "restore" => Ok(pb::Hook::Restore),
        other => anyhow::bail!("unknown hook {other:?}: epoch, migration or restore"),
    }
}

fn phase_name(p: i32) -> &'static str {
    match pb::Phase::try_from(p) {
        Ok(pb::Phase::Converge) => "converge",
        Ok(pb::Phase::Prepared) => "prepared",
        Ok(pb::Phase::Committed) => "committed",
        Ok(pb::Phase::Aborted) => "aborted",
        _ => "unknown",
    }
}

/// Registers with the node on `o.services` and serves the session until it ends.
///
/// # Errors
/// See [`crate::run`].
pub async fn serve(o: Opts) -> anyhow::Result<()> {
    let hooks = o
        .hooks
        .iter()
        .map(|h| hook(h).map(|h| h as i32))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let state: Shared<State> = Arc::default();
    let log = Arc::new(Mutex::new(
        Log::open(o.log.as_deref()).context("opening --log")?,
    ));
    if let Some(path) = &o.api {
        let _ = std::fs::remove_file(path);
        let listener = tokio::net::UnixListener::bind(path)
            .with_context(|| format!("binding {}", path.display()))?;
        tokio::spawn(api(listener, state.clone()));
    }
    let mut client = connect(&o.services)
        .await
        .with_context(|| format!("connecting to {}", o.services.display()))?;
    let (tx, rx) = mpsc::channel(16);
    let register = Msg::Register(pb::Register {
        api_version: o.api_version,
        name: o.name.clone(),
        hooks,
    });
    send(&tx, register).await;
    let mut inbound = client
        .session(ReceiverStream::new(rx))
        .await
        .map_err(|s| anyhow::anyhow!("the node refused the registration: {}", s.message()))?
        .into_inner();
    let mut contributed = 0u64;
    // Once the VM runs elsewhere (the migration committed), this node's sidecar exits: the session's
    // end is then the service's too, and no error.
    let mut migrated = false;
    loop {
        let m = match inbound.message().await {
            Ok(Some(m)) => m,
            Ok(None) if migrated => return Ok(()),
            Err(_) if migrated => return Ok(()),
            Ok(None) => anyhow::bail!("the node ended the session"),
            Err(s) => anyhow::bail!("the node ended the session: {}", s.message()),
        };
        match m.msg {
            Some(NodeMsg::Registered(r)) => {
                tracing::info!(node = %r.node, vms = ?r.vms, "registered");
                lock(&log).write(&Event::Registered { node: r.node });
            }
            Some(NodeMsg::Contribute(req)) => {
                if o.crash_after.is_some_and(|n| contributed >= n) {
                    tracing::error!("--crash-after: exiting abruptly");
                    std::process::exit(3);
                }
                if o.slow_ms > 0 {
                    tokio::time::sleep(Duration::from_millis(o.slow_ms)).await;
                }
                let answer = contribution(&o, &req, &state, &log);
                contributed += 1;
                send(&tx, Msg::Contribution(answer)).await;
            }
            Some(NodeMsg::Durable(d)) => lock(&log).write(&Event::Durable { epoch: d.epoch }),
            Some(NodeMsg::Phase(p)) => {
                migrated |= p.phase == pb::Phase::Committed as i32;
                lock(&log).write(&Event::Phase {
                    phase: phase_name(p.phase).into(),
                    reason: p.reason,
                })
            }
            Some(NodeMsg::Switchover(req)) => {
                // Held in its own task: the session keeps answering contributions meanwhile.
                let (tx, log, veto, hold) = (tx.clone(), log.clone(), o.veto.clone(), o.hold_ms);
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(hold)).await;
                    let veto = veto.unwrap_or_default();
                    lock(&log).write(&Event::Verdict {
                        generation: req.generation,
                        veto: veto.clone(),
                    });
                    let v = pb::SwitchoverVerdict {
                        generation: req.generation,
                        veto,
                    };
                    send(&tx, Msg::Verdict(v)).await;
                });
            }
            Some(NodeMsg::Restore(r)) => {
                let error = match State::decode(&r.data) {
                    Ok(st) => {
                        lock(&log).write(&Event::Restored {
                            epoch: r.epoch,
                            contributed_epoch: r.contributed_epoch,
                            hash: st.hash(),
                            state: st.clone(),
                        });
                        *lock(&state) = st;
                        String::new()
                    }
                    Err(e) => e,
                };
                let done = pb::Restored {
                    epoch: r.epoch,
                    error,
                };
                send(&tx, Msg::Restored(done)).await;
            }
            None => {}
        }
    }
}

/// The answer to `req`: the whole state, or why there is none.
fn contribution(
    o: &Opts,
    req: &pb::ContributeRequest,
    state: &Shared<State>,
    log: &Shared<Log>,
) -> pb::Contribution {
    let refuse = |error: String| pb::Contribution {
        epoch: req.epoch,
        error,
        ..Default::default()
    };
    if o.fail {
        return refuse("--fail: this service fails every contribution".into());
    }
    let st = lock(state).clone();
    let data = st.encode();
    if data.len() > req.max_bytes as usize {
        return refuse(format!(
            "the store's {} bytes exceed the node's bound of {}",
            data.len(),
            req.max_bytes
        ));
    }
    lock(log).write(&Event::Contributed {
        epoch: req.epoch,
        hash: st.hash(),
        state: st,
    });
    pb::Contribution {
        epoch: req.epoch,
        data,
        error: String::new(),
    }
}

async fn send(tx: &mpsc::Sender<pb::ServiceMessage>, m: Msg) {
    // A closed stream ends the session; the read loop sees it.
    let _ = tx.send(pb::ServiceMessage { msg: Some(m) }).await;
}

/// The store's API: one command per line.
async fn api(listener: tokio::net::UnixListener, state: Shared<State>) {
    while let Ok((conn, _)) = listener.accept().await {
        let state = state.clone();
        tokio::spawn(async move {
            let (r, mut w) = conn.into_split();
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let reply = command(&line, &state);
                if w.write_all(format!("{reply}\n").as_bytes()).await.is_err() {
                    break;
                }
            }
        });
    }
}

fn command(line: &str, state: &Shared<State>) -> String {
    let mut parts = line.splitn(3, ' ');
    match (parts.next(), parts.next(), parts.next()) {
        (Some("SET"), Some(k), Some(v)) => {
            let mut st = lock(state);
            st.map.insert(k.to_owned(), v.to_owned());
            st.writes += 1;
            "OK".into()
        }
        (Some("GET"), Some(k), None) => match lock(state).map.get(k) {
            Some(v) => format!("VALUE {v}"),
            None => "NONE".into(),
        },
        (Some("DUMP"), None, None) => {
            serde_json::to_string(&*lock(state)).expect("a state serializes")
        }
        _ => format!("ERR unknown command {line:?}: SET key value, GET key, DUMP"),
    }
}

//! Prometheus exposition shared by the sidecar and the backup: a per-scrape [`Scrape`] that turns a
//! snapshot of the daemon's state into series, the encoding a scraper asked for, and the optional TCP
//! listener that serves `GET /metrics` alone.
//!
//! Each scrape builds a fresh [`Registry`] from a snapshot taken under the daemon's own lock, so that
//! the series of one scrape are mutually consistent and no second copy of the state is kept in sync.
//! What cannot be read back from a snapshot (histograms of epoch pauses and RPO) lives in long-lived
//! metrics that the scrape registers by handle. Names follow Prometheus' conventions
//! (<https://prometheus.io/docs/practices/naming/>): an `endophyte_` prefix, base units (seconds, bytes)
//! in the name, `_total` on counters (added by the encoder), `_ratio` for 0..1.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;

use anyhow::Context;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::{prometheus_text, text};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Metric, Registry};

/// Label pairs of one series, for example `[("backup", "b1")]`.
pub type Labels = Vec<(&'static str, String)>;

/// The `Content-Type` of OpenMetrics text 1.0.0, served when the scraper's `Accept` asks for it
/// (Prometheus does, first); anything else gets Prometheus text 0.0.4.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Buckets of `endophyte_epoch_pause_seconds`: the guest's pause at an epoch's cut, 100 us to 2.5 s.
pub fn pause_buckets() -> impl Iterator<Item = f64> {
    [
        1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5,
    ]
    .into_iter()
}

/// Buckets of `endophyte_rpo_seconds`: the age of the durable epoch, 5 ms to 30 s.
pub fn rpo_buckets() -> impl Iterator<Item = f64> {
    [
        5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ]
    .into_iter()
}

/// One scrape's registry, filled from a snapshot.
pub struct Scrape {
    reg: Registry,
}

impl Scrape {
    /// A scrape whose every series carries `labels` (the VM, say).
    pub fn new(labels: Labels) -> Self {
        let labels = labels
            .into_iter()
            .map(|(k, v)| (Cow::Borrowed(k), Cow::Owned(v)));
        Self {
            reg: Registry::with_labels(labels),
        }
    }

    /// A gauge without labels.
    pub fn gauge(&mut self, name: &str, help: &str, value: f64) {
        self.gauges(name, help, [(vec![], value)]);
    }

    /// A gauge with one series per `(labels, value)`.
    pub fn gauges(
        &mut self,
        name: &str,
        help: &str,
        series: impl IntoIterator<Item = (Labels, f64)>,
    ) {
        let f = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        for (l, v) in series {
            f.get_or_create(&l).set(v);
        }
        self.reg.register(name, help, f);
    }

    /// A counter (`name` without `_total`; the encoder adds it) read from a monotonic total.
    pub fn counter(&mut self, name: &str, help: &str, total: u64) {
        self.counters(name, help, [(vec![], total)]);
    }

    /// A counter with one series per `(labels, total)`.
    pub fn counters(
        &mut self,
        name: &str,
        help: &str,
        series: impl IntoIterator<Item = (Labels, u64)>,
    ) {
        let f = Family::<Labels, Counter>::default();
        for (l, v) in series {
            f.get_or_create(&l).inc_by(v);
        }
        self.reg.register(name, help, f);
    }

    /// A long-lived metric (a histogram, say), registered by handle.
    pub fn metric(&mut self, name: &str, help: &str, m: impl Metric) {
        self.reg.register(name, help, m);
    }

    /// The response to `GET /metrics`, in the format `accept` asks for.
    pub fn respond(self, accept: &HeaderMap) -> Response {
        let open = accept
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.contains("application/openmetrics-text"));
        let mut body = String::new();
        let (r, ct) = if open {
            (text::encode(&mut body, &self.reg), OPENMETRICS)
        } else {
            (
                prometheus_text::encode(&mut body, &self.reg),
                prometheus_text::CONTENT_TYPE,
            )
        };
        match r {
            Ok(()) => {
                ([(header::CONTENT_TYPE, HeaderValue::from_static(ct))], body).into_response()
            }
            Err(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "encoding the metrics failed",
            )
                .into_response(),
        }
    }
}

/// Binds `addr` for `GET /metrics` over TCP (for Prometheus on another host; the control socket serves
/// the same on `/metrics`). Binding now, not in the server task, makes a taken port fail the command.
/// Call inside a tokio runtime.
///
/// # Errors
/// The address cannot be bound (in use, not local, no permission).
pub fn bind_tcp(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr)
        .with_context(|| format!("binding the metrics address {addr}"))?;
    l.set_nonblocking(true)?;
    Ok(tokio::net::TcpListener::from_std(l)?)
}

/// Serves `router` (which should route `/metrics` only: the control API stays on its socket) on
/// `listener` until the process ends.
pub async fn serve_tcp(listener: tokio::net::TcpListener, router: axum::Router) {
    let addr = listener.local_addr().ok();
    if let Err(e) = axum::serve(listener, router).await {
        tracing::error!(?addr, "the metrics listener failed: {e}");
    }
}

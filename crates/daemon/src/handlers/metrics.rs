//! `GET /v1/metrics` (Prometheus text) and `GET /v1/vms/{vm}/measure` (Measure-VM).

use std::sync::Arc;

use api::vms::VmState;
use api::ErrorCode;
use bytes::Bytes;
use hyper::Response;

use crate::error::ApiError;
use crate::http::body::{full, json, Body};
use crate::metering::{prometheus, prometheus_network, MetricsRow, NetworkRow};
use crate::service::{find, Service};

type Answer = Result<Response<Body>, ApiError>;

pub async fn metrics(svc: &Arc<Service>) -> Answer {
    let adapters = svc.switches.all_counters().await;
    let names: std::collections::HashMap<uuid::Uuid, String> = {
        let store = svc.store();
        adapters
            .iter()
            .filter_map(|(id, _)| store.get(*id).map(|e| (*id, e.name())))
            .collect()
    };
    let network: Vec<NetworkRow<'_>> = adapters
        .iter()
        .filter_map(|(id, c)| {
            Some(NetworkRow {
                id: *id,
                name: names.get(id)?,
                mac: &c.mac,
                counters: c.counters.as_ref()?,
            })
        })
        .collect();
    let network = prometheus_network(&network);
    let vms = svc
        .workers
        .as_ref()
        .map(|w| w.metrics())
        .unwrap_or_default();
    let mut vms = vms;
    vms.sort_by(|a, b| a.1.cmp(&b.1));
    let rows: Vec<MetricsRow<'_>> = vms
        .iter()
        .map(|(id, name, processor, meter)| MetricsRow {
            id: *id,
            name,
            processor: *processor,
            meter,
        })
        .collect();
    Response::builder()
        .status(200)
        .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
        .body(full(Bytes::from(prometheus(&rows) + &network)))
        .map_err(|e| ApiError::internal(format!("cannot build the response: {e}")))
}

pub async fn measure(svc: &Arc<Service>, key: &str) -> Answer {
    let (id, name, state) = {
        let store = svc.store();
        let entry = find(&store, key)?;
        (entry.id, entry.name(), svc.state_of(entry).state)
    };
    let not_running = || {
        ApiError::new(
            ErrorCode::InvalidState,
            format!("VM {name} is {state:?}; it is measured while it runs"),
        )
    };
    if !matches!(state, VmState::Running | VmState::Paused) {
        return Err(not_running());
    }
    let mut m = svc
        .workers
        .as_ref()
        .and_then(|w| w.measure(id))
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::InvalidState,
                format!("VM {name} has no counters yet; ask again in a second"),
            )
        })?;
    let mut connections = svc.switches.connections(id);
    svc.switches.add_counters(&mut connections).await;
    m.network_adapters = connections
        .into_iter()
        .filter_map(|c| {
            Some(api::vms::AdapterMeasurement {
                counters: c.counters?,
                mac: c.mac,
            })
        })
        .collect();
    m.network_received_bytes = m
        .network_adapters
        .iter()
        .map(|a| a.counters.received_bytes)
        .sum();
    m.network_sent_bytes = m
        .network_adapters
        .iter()
        .map(|a| a.counters.sent_bytes)
        .sum();
    Ok(json(200, &m))
}

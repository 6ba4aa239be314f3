//! Maps method and path to a handler; checks the token on TCP.

use std::sync::Arc;

use api::ErrorCode;
use hyper::body::Incoming;
use hyper::{Method, Request, Response};
use tokio::sync::watch;

use crate::error::ApiError;
use crate::handlers::{checkpoints, disks, jobs, lifecycle, metrics, switches, transfer, vms};
use crate::http::body::{self, json, Body};
use crate::http::sse;
use crate::job_quota::Client;
use crate::service::Service;

/// Where a request came from.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Unix,
    Tcp,
}

pub async fn handle(
    svc: Arc<Service>,
    req: Request<Incoming>,
    transport: Transport,
    client: Client,
    shutdown: watch::Receiver<bool>,
) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let resp = match route(&svc, req, transport, client, shutdown).await {
        Ok(resp) => resp,
        Err(e) => {
            let mut resp = body::error(&e);
            if e.code == ErrorCode::MethodNotAllowed {
                // RFC 9110: a 405 lists the methods the resource has.
                if let Some(allow) = segments(&path)
                    .ok()
                    .and_then(|segs| allowed_methods(&segs))
                    .and_then(|a| a.parse().ok())
                {
                    resp.headers_mut().insert(hyper::header::ALLOW, allow);
                }
            }
            resp
        }
    };
    tracing::debug!(%method, %path, status = resp.status().as_u16(), "request");
    resp
}

fn authorized(svc: &Service, req: &Request<Incoming>) -> bool {
    let Some(token) = &svc.token else {
        return false;
    };
    let Some(given) = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    // RFC 7235: the scheme is case-insensitive; the credentials follow white space.
    let Some((scheme, given)) = given.trim_start().split_once([' ', '\t']) else {
        return false;
    };
    if !scheme.eq_ignore_ascii_case("bearer") {
        return false;
    }
    constant_time_eq(given.trim().as_bytes(), token.as_bytes())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Splits and percent-decodes the path into segments.
fn segments(path: &str) -> Result<Vec<String>, ApiError> {
    path.trim_start_matches('/')
        .split('/')
        .map(|s| {
            percent_decode(s).ok_or_else(|| {
                malformed(format!(
                    "the path segment {s:?} is not valid percent-encoded UTF-8"
                ))
            })
        })
        .collect()
}

fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn malformed(message: String) -> ApiError {
    ApiError::new(ErrorCode::MalformedRequest, message)
}

fn query_param(req: &Request<Incoming>, name: &str) -> Option<String> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then(|| percent_decode(v).unwrap_or_default())
    })
}

/// Seconds a client told `TooManyRequests` is asked to wait before retrying.
const RETRY_AFTER_SECONDS: u64 = 5;

/// Whether `method` on `segs` starts a job: a route answering 202 outside `/v1/jobs`
/// (where 202 is a cancellation, which starts nothing).
fn starts_job(method: &Method, segs: &[&str]) -> bool {
    segs.get(1) != Some(&"jobs")
        && api::openapi::routes().into_iter().any(|r| {
            r.status == 202
                && r.method.eq_ignore_ascii_case(method.as_str())
                && matches_template(r.path, segs)
        })
}

/// The job id in a 202 answer's `Location: /v1/jobs/<id>`.
fn started_job(resp: &Response<Body>) -> Option<uuid::Uuid> {
    if resp.status() != hyper::StatusCode::ACCEPTED {
        return None;
    }
    let location = resp.headers().get("location")?.to_str().ok()?;
    uuid::Uuid::parse_str(location.strip_prefix("/v1/jobs/")?).ok()
}

async fn route(
    svc: &Arc<Service>,
    req: Request<Incoming>,
    transport: Transport,
    client: Client,
    shutdown: watch::Receiver<bool>,
) -> Result<Response<Body>, ApiError> {
    if transport == Transport::Tcp && !authorized(svc, &req) {
        return Err(ApiError::new(
            ErrorCode::Unauthorized,
            "requests over TCP need `Authorization: Bearer <token>`; the token is in <data-dir>/token on the host",
        ));
    }
    if body::announced_too_large(req.body()) {
        return Err(body::too_large());
    }
    let segs = segments(req.uri().path())?;
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    // A method the route does not take is 405 with `Allow` everywhere, the
    // diagnostics' routes included.
    let method_known = api::openapi::routes().into_iter().any(|r| {
        r.method.eq_ignore_ascii_case(req.method().as_str()) && matches_template(r.path, &segs)
    });
    if segs.get(1) == Some(&"diagnostics")
        && transport == Transport::Tcp
        && !svc.config.enable_diagnostics
        && method_known
    {
        return Err(ApiError::not_found(format!(
            "/{} is served on the unix socket only; start viridiand with --enable-diagnostics to serve it over TCP",
            segs.join("/")
        )));
    }
    if !starts_job(req.method(), &segs) {
        return dispatch(svc, req, &segs, shutdown).await;
    }
    let place = svc
        .job_quota
        .reserve(client)
        .map_err(|full| ApiError::too_many(full.to_string(), RETRY_AFTER_SECONDS))?;
    let resp = dispatch(svc, req, &segs, shutdown).await?;
    if let Some(id) = started_job(&resp) {
        place.bind(id);
        // The job may have finished before its place was tied to it.
        if svc.jobs.get(id).map_or(true, |j| j.state.is_finished()) {
            svc.job_quota.finished(id);
        }
    }
    Ok(resp)
}

async fn dispatch(
    svc: &Arc<Service>,
    req: Request<Incoming>,
    segs: &[&str],
    shutdown: watch::Receiver<bool>,
) -> Result<Response<Body>, ApiError> {
    let m = req.method().clone();
    let timeout = query_param(&req, "timeout");
    let (limit, after) = (query_param(&req, "limit"), query_param(&req, "after"));
    let query = req.uri().query().map(str::to_string);
    let body = req.into_body();
    use Method as M;
    match (&m, segs) {
        (&M::GET, ["v1", "host"]) => Ok(json(200, &svc.host_info())),
        (&M::PATCH, ["v1", "host"]) => {
            let req: api::host::UpdateHostRequest = crate::http::body::read_json(body).await?;
            Ok(json(200, &svc.update_host(&req)?))
        }
        (&M::GET, ["v1", "metrics"]) => metrics::metrics(svc).await,
        (&M::GET, ["v1", "vms", vm, "measure"]) => metrics::measure(svc, vm).await,
        (&M::GET, ["v1", "openapi.json"]) => Ok(json(200, &api::openapi::document())),
        (&M::GET, ["v1", "events"]) => sse::events(svc, shutdown),

        (&M::POST, ["v1", "vms", "import"]) => transfer::import(svc, body).await,
        (&M::POST, ["v1", "vms", "import", "check"]) => transfer::check_import(svc, body).await,
        (&M::POST, ["v1", "vms", vm, "export"]) => transfer::export(svc, vm, body).await,
        (&M::GET, ["v1", "vms"]) => vms::list(svc),
        (&M::POST, ["v1", "vms"]) => vms::create(svc, body).await,
        (&M::GET, ["v1", "vms", vm]) => vms::get(svc, vm).await,
        (&M::PATCH, ["v1", "vms", vm]) => vms::update(svc, vm, body).await,
        (&M::DELETE, ["v1", "vms", vm]) => vms::delete(svc, vm, query.as_deref()),
        (&M::POST, ["v1", "vms", vm, "move-storage"]) => vms::move_storage(svc, vm, body).await,
        (&M::POST, ["v1", "vms", vm, "upgrade"]) => vms::upgrade(svc, vm),
        (&M::PUT, ["v1", "vms", vm, "settings"]) => vms::replace_settings(svc, vm, body).await,
        (&M::GET, ["v1", "vms", vm, "processor"]) => vms::processor(svc, vm),
        (&M::PATCH, ["v1", "vms", vm, "processor"]) => vms::update_processor(svc, vm, body).await,
        (&M::GET, ["v1", "vms", vm, "drives"]) => vms::drives(svc, vm),
        (&M::POST, ["v1", "vms", vm, "drives"]) => vms::add_drive(svc, vm, body).await,
        (&M::PUT, ["v1", "vms", vm, "drives", c, n, l]) => {
            vms::update_drive(svc, vm, (c, n, l), body).await
        }
        (&M::DELETE, ["v1", "vms", vm, "drives", c, n, l]) => vms::remove_drive(svc, vm, (c, n, l)),
        (&M::GET, ["v1", "vms", vm, "network-adapters"]) => vms::adapters(svc, vm),
        (&M::POST, ["v1", "vms", vm, "network-adapters"]) => vms::add_adapter(svc, vm, body).await,
        (&M::DELETE, ["v1", "vms", vm, "network-adapters", mac]) => {
            vms::remove_adapter(svc, vm, mac)
        }
        (&M::PATCH, ["v1", "vms", vm, "network-adapters", mac]) => {
            switches::update_adapter(svc, vm, mac, body).await
        }
        (&M::POST, ["v1", "vms", vm, "network-adapters", mac, "connect"]) => {
            switches::connect(svc, vm, mac, body).await
        }
        (&M::POST, ["v1", "vms", vm, "network-adapters", mac, "disconnect"]) => {
            switches::disconnect(svc, vm, mac).await
        }

        (&M::GET, ["v1", "switches"]) => switches::list(svc).await,
        (&M::POST, ["v1", "switches"]) => switches::create(svc, body).await,
        (&M::GET, ["v1", "switches", sw]) => switches::get(svc, sw).await,
        (&M::GET, ["v1", "switches", sw, "leases"]) => switches::leases(svc, sw).await,
        (&M::PATCH, ["v1", "switches", sw]) => switches::update(svc, sw, body).await,
        (&M::DELETE, ["v1", "switches", sw]) => switches::delete(svc, sw, query.as_deref()).await,

        (&M::GET, ["v1", "vms", vm, "checkpoints"]) => checkpoints::list(svc, vm),
        (&M::POST, ["v1", "vms", vm, "checkpoints"]) => checkpoints::create(svc, vm, body).await,
        (&M::PATCH, ["v1", "vms", vm, "checkpoints", cp]) => {
            checkpoints::rename(svc, vm, cp, body).await
        }
        (&M::DELETE, ["v1", "vms", vm, "checkpoints", cp]) => {
            checkpoints::delete(svc, vm, cp, false)
        }
        (&M::DELETE, ["v1", "vms", vm, "checkpoints", cp, "subtree"]) => {
            checkpoints::delete(svc, vm, cp, true)
        }
        (&M::POST, ["v1", "vms", vm, "checkpoints", cp, "apply"]) => {
            checkpoints::apply(svc, vm, cp)
        }

        (&M::GET, ["v1", "vms", vm, "console", "log"]) => lifecycle::console_log(svc, vm),
        (&M::POST, ["v1", "vms", vm, action]) if lifecycle::ACTIONS.contains(action) => {
            lifecycle::action(svc, vm, action, body).await
        }

        (&M::GET, ["v1", "jobs"]) => jobs::list(svc, limit.as_deref(), after.as_deref()),
        (&M::GET, ["v1", "jobs", id]) => jobs::get(svc, id),
        (&M::DELETE, ["v1", "jobs", id]) => jobs::cancel(svc, id),
        (&M::GET, ["v1", "jobs", id, "wait"]) => jobs::wait(svc, id, timeout.as_deref()).await,
        (&M::GET, ["v1", "jobs", id, "outcome"]) => jobs::outcome(svc, id),
        (&M::POST, ["v1", "diagnostics", "sleep-job"]) => jobs::sleep_job(svc, body).await,

        (&M::POST, ["v1", "disks", op]) => disks::submit(svc, op, body).await,

        _ => Err(unknown_route(&m, segs)),
    }
}

fn unknown_route(method: &Method, segs: &[&str]) -> ApiError {
    let path = format!("/{}", segs.join("/"));
    let known = api::openapi::routes()
        .into_iter()
        .any(|r| matches_template(r.path, segs));
    if known {
        ApiError::new(
            ErrorCode::MethodNotAllowed,
            format!("{path} does not take {method}; see /v1/openapi.json"),
        )
    } else {
        ApiError::not_found(format!("there is no endpoint {path}; see /v1/openapi.json"))
    }
}

/// The methods of the route-table path that `segs` names, as an `Allow` value
/// (`GET, PATCH`). Where several templates match (`/v1/vms/import` and
/// `/v1/vms/{vm}`), the one with the most literal segments names the path.
fn allowed_methods(segs: &[String]) -> Option<String> {
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    let routes = api::openapi::routes();
    let literals = |path: &str| path.split('/').filter(|s| !s.starts_with('{')).count();
    let best = routes
        .iter()
        .filter(|r| matches_template(r.path, &segs))
        .map(|r| literals(r.path))
        .max()?;
    let mut methods: Vec<String> = routes
        .iter()
        .filter(|r| matches_template(r.path, &segs) && literals(r.path) == best)
        .map(|r| r.method.to_uppercase())
        .collect();
    methods.sort();
    methods.dedup();
    Some(methods.join(", "))
}

fn matches_template(template: &str, segs: &[&str]) -> bool {
    let t: Vec<&str> = template.trim_start_matches('/').split('/').collect();
    t.len() == segs.len()
        && t.iter()
            .zip(segs)
            .all(|(t, s)| t.starts_with('{') || t == s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding_handles_spaces_and_rejects_bad_escapes() {
        assert_eq!(percent_decode("web%2001").as_deref(), Some("web 01"));
        assert_eq!(percent_decode("a%2Fb").as_deref(), Some("a/b"));
        assert_eq!(percent_decode("bad%zz"), None);
        assert_eq!(percent_decode("cut%2"), None);
    }
}

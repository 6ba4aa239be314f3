//! `GET /v1/events`: server-sent events from the event bus.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use api::events::{Event, Overflow, OVERFLOW};
use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::Response;
use tokio::sync::{broadcast, mpsc, watch};

use crate::error::ApiError;
use crate::http::body::Body;
use crate::service::Service;

/// Events buffered for one listener before it counts as fallen behind.
const LISTENER_BUFFER: usize = 256;

fn frame(event: &Event) -> Bytes {
    let data = serde_json::to_string(event).unwrap_or_default();
    Bytes::from(format!(
        "id: {}\nevent: {}\ndata: {}\n\n",
        event.seq,
        event.body.name(),
        data
    ))
}

/// Seconds a listener turned away is asked to wait before trying again.
const RETRY_AFTER_SECONDS: u64 = 5;

/// One connected listener; dropping it frees its place.
struct ListenerPlace(Arc<AtomicU32>);

impl ListenerPlace {
    fn take(count: &Arc<AtomicU32>, max: u32) -> Option<ListenerPlace> {
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| ListenerPlace(count.clone()))
    }
}

impl Drop for ListenerPlace {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Streams events in order; at most `--max-event-listeners` at once, more are
/// answered `TooManyRequests`. A listener that falls behind gets a final
/// `event: overflow` after the last event it was sent, then the stream ends: it is
/// disconnected, never silently skipped.
pub fn events(
    svc: &Arc<Service>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<Response<Body>, ApiError> {
    let max = svc.config.max_event_listeners;
    let place = ListenerPlace::take(&svc.event_listeners, max).ok_or_else(|| {
        ApiError::too_many(
            format!("{max} event listeners are connected, the most this service serves at once; retry later"),
            RETRY_AFTER_SECONDS,
        )
    })?;
    let mut rx = svc.events.subscribe();
    let (tx, out) = mpsc::channel::<Bytes>(LISTENER_BUFFER);
    tokio::spawn(async move {
        let _place = place;
        let overflow = |why: &str| {
            let data = serde_json::to_string(&Overflow { reason: why.into() }).unwrap_or_default();
            Bytes::from(format!("event: {OVERFLOW}\ndata: {data}\n\n"))
        };
        // A comment line at once, so a client knows it is subscribed; it ends no
        // block, so it belongs to the first event's frame (parsers that take a
        // comment-only block for an empty event see none).
        tx.send(Bytes::from_static(b": connected\n")).await.ok();
        loop {
            let item = tokio::select! {
                item = rx.recv() => item,
                _ = shutdown.changed() => return,
                _ = tx.closed() => return,
            };
            match item {
                Ok(event) => {
                    if let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(frame(&event)) {
                        let _ = tx.send(overflow("listener fell behind")).await;
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    let _ = tx.send(overflow("listener fell behind")).await;
                    return;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    let stream = futures_util::stream::unfold(out, |mut out| async move {
        out.recv().await.map(|b| (Ok(Frame::data(b)), out))
    });
    Ok(Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(StreamBody::new(stream).boxed())
        .unwrap_or_else(|_| Response::new(crate::http::body::full(""))))
}

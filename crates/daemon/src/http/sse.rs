//! `GET /v1/events`: server-sent events from the event bus.

use std::sync::Arc;

use api::events::Event;
use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::Response;
use tokio::sync::{broadcast, mpsc, watch};

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

/// Streams events in order. A listener that falls behind gets a final
/// `event: overflow` after the last event it was sent, then the stream ends: it is
/// disconnected, never silently skipped.
pub fn events(svc: &Arc<Service>, mut shutdown: watch::Receiver<bool>) -> Response<Body> {
    let mut rx = svc.events.subscribe();
    let (tx, out) = mpsc::channel::<Bytes>(LISTENER_BUFFER);
    tokio::spawn(async move {
        let overflow = |why: &str| {
            Bytes::from(format!(
                "event: overflow\ndata: {{\"reason\":\"{why}\"}}\n\n"
            ))
        };
        tx.send(Bytes::from_static(b": connected\n\n")).await.ok();
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
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(StreamBody::new(stream).boxed())
        .unwrap_or_else(|_| Response::new(crate::http::body::full("")))
}

//! The event bus behind `GET /v1/events`: one sequence for job and VM changes.

use std::sync::{Arc, Mutex};

use api::events::{Event, EventBody};
use tokio::sync::broadcast;

/// How many events a listener may be behind before it is disconnected.
pub const LISTENER_BACKLOG: usize = 1024;

pub struct EventBus {
    seq: Mutex<u64>,
    tx: broadcast::Sender<Arc<Event>>,
}

impl Default for EventBus {
    fn default() -> Self {
        let (tx, _) = broadcast::channel(LISTENER_BACKLOG);
        EventBus {
            seq: Mutex::new(0),
            tx,
        }
    }
}

impl EventBus {
    /// Numbers and sends an event. Sequence numbering and sending happen under one
    /// lock, so every listener sees events in sequence order.
    pub fn publish(&self, body: EventBody) {
        let mut seq = self.seq.lock().unwrap_or_else(|p| p.into_inner());
        *seq += 1;
        // No listener is not an error: the event simply has no audience.
        let _ = self.tx.send(Arc::new(Event { seq: *seq, body }));
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.tx.subscribe()
    }
}

//! In-process notifications of job changes: long-polls (and later event
//! streams) subscribe here instead of polling the database.

use tokio::sync::broadcast;
use uuid::Uuid;

use crate::domain::JobStatus;

/// One change of one job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobEvent {
    pub id: Uuid,
    /// The status after the change (the store has the rest).
    pub status: JobStatus,
}

/// A broadcast hub. A subscriber that falls behind sees `Lagged` and must
/// re-read the job from the store: events are wake-ups, the store is the truth.
#[derive(Clone)]
pub struct Events {
    tx: broadcast::Sender<JobEvent>,
}

impl Default for Events {
    fn default() -> Self {
        Events { tx: broadcast::channel(4096).0 }
    }
}

impl Events {
    pub fn publish(&self, event: JobEvent) {
        // No subscribers is fine: nobody is waiting.
        let _ = self.tx.send(event);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<JobEvent> {
        self.tx.subscribe()
    }
}

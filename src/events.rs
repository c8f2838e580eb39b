//! In-process notifications of job changes: long-polls and event streams wait
//! here instead of polling the database.
//!
//! Events are wake-ups, the store is the truth. A waiter on one job watches
//! that job alone ([`Events::watch`]): a long-poll is woken by its own job's
//! changes, never by the thousands of other jobs' (a broadcast to every
//! waiter costs a wake-up per waiter per event). Whole-node listeners (the
//! webhook trigger) subscribe to every event.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{broadcast, watch};
use uuid::Uuid;

use crate::domain::JobStatus;

/// One change of one job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobEvent {
    pub id: Uuid,
    /// The status after the change (the store has the rest).
    pub status: JobStatus,
}

/// The hub. Cheap to clone.
#[derive(Clone)]
pub struct Events {
    inner: Arc<Inner>,
}

struct Inner {
    /// Every event, for whole-node listeners; one that falls behind sees
    /// `Lagged` and must re-read the store.
    all: broadcast::Sender<JobEvent>,
    /// The jobs someone waits on, with the last status published; an entry
    /// lives while it has receivers (the last [`JobWatch`] removes it).
    jobs: Mutex<HashMap<Uuid, watch::Sender<Option<JobStatus>>>>,
}

impl Default for Events {
    fn default() -> Self {
        Events { inner: Arc::new(Inner { all: broadcast::channel(4096).0, jobs: Mutex::new(HashMap::new()) }) }
    }
}

impl Events {
    pub fn publish(&self, event: JobEvent) {
        // No subscribers is fine: nobody is waiting.
        let _ = self.inner.all.send(event);
        let jobs = self.inner.jobs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(job) = jobs.get(&event.id) {
            job.send_if_modified(|last| {
                // An end stays the end: a late event of a run that stopped must not hide it.
                if last.is_some_and(JobStatus::is_final) && !event.status.is_final() {
                    return false;
                }
                *last = Some(event.status);
                true
            });
        }
    }

    /// Every event of every job.
    pub fn subscribe(&self) -> broadcast::Receiver<JobEvent> {
        self.inner.all.subscribe()
    }

    /// The changes of one job, from now on: watch before reading the job, so
    /// a change between the read and the wait is not missed.
    pub fn watch(&self, id: Uuid) -> JobWatch {
        let mut jobs = self.inner.jobs.lock().unwrap_or_else(|p| p.into_inner());
        let rx = jobs.entry(id).or_insert_with(|| watch::channel(None).0).subscribe();
        JobWatch { id, rx: Some(rx), events: self.inner.clone() }
    }
}

/// A waiter on one job's changes.
pub struct JobWatch {
    id: Uuid,
    /// Always `Some` until dropped.
    rx: Option<watch::Receiver<Option<JobStatus>>>,
    events: Arc<Inner>,
}

impl JobWatch {
    /// Waits for the job's next change and returns its status then.
    pub async fn changed(&mut self) -> JobStatus {
        let rx = self.rx.as_mut().expect("present until dropped");
        loop {
            if rx.changed().await.is_err() {
                // The sender lives in the map while this receiver does.
                std::future::pending::<()>().await;
            }
            if let Some(status) = *rx.borrow_and_update() {
                return status;
            }
        }
    }
}

impl Drop for JobWatch {
    fn drop(&mut self) {
        drop(self.rx.take());
        let mut jobs = self.events.jobs.lock().unwrap_or_else(|p| p.into_inner());
        if jobs.get(&self.id).is_some_and(|job| job.receiver_count() == 0) {
            jobs.remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_watch_sees_its_own_job_only_and_keeps_the_end() {
        let events = Events::default();
        let (mine, other) = (Uuid::now_v7(), Uuid::now_v7());
        let mut watch = events.watch(mine);
        events.publish(JobEvent { id: other, status: JobStatus::Succeeded });
        events.publish(JobEvent { id: mine, status: JobStatus::Succeeded });
        events.publish(JobEvent { id: mine, status: JobStatus::Running });
        assert_eq!(watch.changed().await, JobStatus::Succeeded);
        drop(watch);
        assert!(events.inner.jobs.lock().unwrap().is_empty(), "the last watch removes its entry");
    }
}

//! The queue from the source to one sink, bounded in batches and in bytes: a run of wide
//! rows waits at the source instead of filling memory, whatever the number of events.
//!
//! A batch takes a share of the sink's byte budget when it is sent and gives it back when
//! the sink asks for the next one (or the receiver is dropped), so the budget covers what
//! is queued plus the batch the sink is working on. Batches are shared between sinks
//! (`Arc`), so the relay holds at most about one budget of queued data, however many sinks.

use std::sync::Arc;

use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use super::Batch;

/// Batches a sink may have queued before the source waits.
pub const QUEUE_DEPTH: usize = 64;

/// Bytes a sink may have queued (values and event overhead, `Event::approx_bytes`).
pub const QUEUE_BYTES: usize = 32 << 20;

/// The budget is counted in units of this many bytes (a semaphore counts in `u32`).
const UNIT: usize = 1024;

/// The sink is gone.
#[derive(Debug)]
pub struct Closed;

/// A batch with the share of the budget it holds.
type Item = (Batch, OwnedSemaphorePermit);

pub fn channel() -> (QueueSender, QueueReceiver) {
    let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
    let budget = Arc::new(Semaphore::new(QUEUE_BYTES / UNIT));
    (QueueSender { tx, budget }, QueueReceiver { rx, held: None })
}

#[derive(Clone)]
pub struct QueueSender {
    tx: mpsc::Sender<Item>,
    budget: Arc<Semaphore>,
}

impl QueueSender {
    /// Queue `batch` of `bytes`, waiting for room. Cancel-safe: dropped before it
    /// completes, it has queued nothing and holds nothing.
    pub async fn send(&self, batch: Batch, bytes: usize) -> Result<(), Closed> {
        // A batch larger than the whole budget takes all of it, and goes alone.
        let units = Self::units(bytes);
        let share = self
            .budget
            .clone()
            .acquire_many_owned(units)
            .await
            .map_err(|_| Closed)?;
        let slot = self.tx.reserve().await.map_err(|_| Closed)?;
        slot.send((batch, share));
        Ok(())
    }

    /// Bytes free in the budget now (for tests and metrics).
    pub fn free_bytes(&self) -> usize {
        self.budget.available_permits() * UNIT
    }

    /// A batch of `bytes` would be queued without waiting (as far as bytes go).
    pub fn has_room(&self, bytes: usize) -> bool {
        self.budget.available_permits() >= Self::units(bytes) as usize
    }

    fn units(bytes: usize) -> u32 {
        (bytes / UNIT).clamp(1, QUEUE_BYTES / UNIT) as u32
    }
}

pub struct QueueReceiver {
    rx: mpsc::Receiver<Item>,
    /// The share of the batch the sink works on, given back at the next receive.
    held: Option<OwnedSemaphorePermit>,
}

impl QueueReceiver {
    pub async fn recv(&mut self) -> Option<Batch> {
        self.held = None;
        let (batch, share) = self.rx.recv().await?;
        self.held = Some(share);
        Some(batch)
    }

    /// For a sink that runs on a blocking thread.
    pub fn blocking_recv(&mut self) -> Option<Batch> {
        self.held = None;
        let (batch, share) = self.rx.blocking_recv()?;
        self.held = Some(share);
        Some(batch)
    }

    /// The next batch if one is queued.
    pub fn try_recv(&mut self) -> Result<Batch, mpsc::error::TryRecvError> {
        self.held = None;
        let (batch, share) = self.rx.try_recv()?;
        self.held = Some(share);
        Ok(batch)
    }

    /// Nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }
}

/// Sum of the approximate sizes of a batch's events.
pub fn batch_bytes(events: &[walrelay_model::Event]) -> usize {
    events.iter().map(walrelay_model::Event::approx_bytes).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use walrelay_model::{Event, Lsn};

    fn batch() -> Batch {
        Arc::new(vec![Event::Keepalive(Lsn(1))])
    }

    #[tokio::test]
    async fn the_budget_bounds_bytes_and_comes_back_when_the_sink_moves_on() {
        let (tx, mut rx) = channel();
        tx.send(batch(), QUEUE_BYTES / 2).await.unwrap();
        tx.send(batch(), QUEUE_BYTES / 2).await.unwrap();
        assert_eq!(tx.free_bytes(), 0, "a third batch would wait");
        rx.recv().await.unwrap();
        assert_eq!(
            tx.free_bytes(),
            0,
            "the batch in the sink's hands still counts"
        );
        rx.recv().await.unwrap();
        assert_eq!(
            tx.free_bytes(),
            QUEUE_BYTES / 2,
            "the first one's share is back"
        );
        tx.send(batch(), 10 * UNIT).await.unwrap();
        assert_eq!(tx.free_bytes(), QUEUE_BYTES / 2 - 10 * UNIT);
    }

    #[tokio::test]
    async fn a_batch_larger_than_the_budget_goes_alone() {
        let (tx, mut rx) = channel();
        tx.send(batch(), QUEUE_BYTES * 4).await.unwrap();
        assert_eq!(tx.free_bytes(), 0);
        rx.recv().await.unwrap();
        drop(rx);
        assert!(tx.send(batch(), 1).await.is_err(), "the sink is gone");
    }
}

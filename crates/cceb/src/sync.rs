//! Locks that outlive a panic: a thread that panicked while holding one left
//! plain data behind, never a broken invariant we rely on, so the bridge
//! keeps going instead of panicking in turn. And [`Signal`], the wake-up of
//! one waiting task.

use futures_util::task::AtomicWaker;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::task::{Context, Poll};

pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

pub fn read<T: ?Sized>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

pub fn write<T: ?Sized>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}

/// Wakes the task waiting on it, or the next one to wait if none is: a flag
/// and a waker, as `Notify::notify_one` with its one permit. Made for a
/// session's connection, which waits on it on every turn of its loop: a
/// `Notify` locks its waiter list to enter it and again to leave it each
/// time, which showed in the profile of every delivery.
///
/// One waiter at a time: a second one replaces the first's waker (each
/// connection has a signal of its own).
#[derive(Debug, Default)]
pub struct Signal {
    set: AtomicBool,
    waker: AtomicWaker,
}

impl Signal {
    pub fn notify(&self) {
        self.set.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Ready once the signal was given (since the last wait that saw it).
    pub fn notified(&self) -> Notified<'_> {
        Notified(self)
    }
}

/// A wait on a [`Signal`]. Dropped unfinished (its `select!` took another
/// branch), it forgets the waiter's waker: a signal given while the task is
/// busy elsewhere is kept in the flag for its next wait, not turned into a
/// wake-up of a task that is running anyway.
pub struct Notified<'a>(&'a Signal);

impl Future for Notified<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let s = self.0;
        if s.set.swap(false, Ordering::AcqRel) {
            return Poll::Ready(());
        }
        s.waker.register(cx.waker());
        // A notify between the swap and the register woke the old waker.
        if s.set.swap(false, Ordering::AcqRel) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

impl Drop for Notified<'_> {
    fn drop(&mut self) {
        self.0.waker.take();
    }
}

#[cfg(test)]
mod tests {
    use super::Signal;
    use std::sync::Arc;

    #[tokio::test]
    async fn a_signal_given_before_the_wait_is_kept_once() {
        let s = Signal::default();
        s.notify();
        s.notify();
        s.notified().await;
        assert!(futures_util::FutureExt::now_or_never(s.notified()).is_none(), "two notifies are one permit");
    }

    #[tokio::test]
    async fn a_signal_wakes_the_task_waiting_on_it() {
        let s = Arc::new(Signal::default());
        let waiting = tokio::spawn({
            let s = s.clone();
            async move { s.notified().await }
        });
        tokio::task::yield_now().await;
        s.notify();
        // Not a timing threshold: a wake-up that never comes fails instead of hanging.
        tokio::time::timeout(std::time::Duration::from_secs(60), waiting).await.expect("woken").expect("ran");
    }
}

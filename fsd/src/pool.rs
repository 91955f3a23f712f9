//! A fixed set of threads running fetch jobs, demand jobs before background ones.
//!
//! Backend calls block, so they run here rather than on the FUSE threads: a
//! reader waits for its chunks with a deadline and can give up even when a
//! backend call hangs.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use tracing::error;

/// Work for the pool. `cancel` is called instead of `run` for jobs still
/// queued when the pool shuts down, so their waiters are answered.
pub trait Job: Send + 'static {
    fn run(self: Box<Self>);
    fn cancel(self: Box<Self>);
}

/// Whether a reader is waiting for the job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priority {
    Demand,
    Background,
}

#[derive(Default)]
struct Queues {
    demand: VecDeque<Box<dyn Job>>,
    background: VecDeque<Box<dyn Job>>,
    shutdown: bool,
}

struct Shared {
    queues: Mutex<Queues>,
    ready: Condvar,
}

pub struct WorkerPool {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl WorkerPool {
    pub fn new(workers: usize) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            queues: Mutex::new(Queues::default()),
            ready: Condvar::new(),
        });
        let mut threads = Vec::with_capacity(workers);
        for i in 0..workers.max(1) {
            let shared = Arc::clone(&shared);
            threads.push(
                std::thread::Builder::new()
                    .name(format!("lode-fetch-{i}"))
                    .spawn(move || worker(&shared))?,
            );
        }
        Ok(Self {
            shared,
            threads: Mutex::new(threads),
        })
    }

    /// Queues a job. After shutdown the job is cancelled at once.
    pub fn submit(&self, priority: Priority, job: Box<dyn Job>) {
        let mut q = self.shared.queues.lock().unwrap_or_else(|e| e.into_inner());
        if q.shutdown {
            drop(q);
            job.cancel();
            return;
        }
        match priority {
            Priority::Demand => q.demand.push_back(job),
            Priority::Background => q.background.push_back(job),
        }
        drop(q);
        self.shared.ready.notify_one();
    }

    /// Background jobs not yet started.
    pub fn background_queued(&self) -> usize {
        self.shared
            .queues
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .background
            .len()
    }

    /// Cancels queued jobs and lets the workers exit after their current job.
    /// Does not wait for them (a backend call may be stuck until its timeout).
    pub fn shutdown(&self) {
        let cancelled: Vec<_> = {
            let mut q = self.shared.queues.lock().unwrap_or_else(|e| e.into_inner());
            q.shutdown = true;
            let q = &mut *q;
            q.demand.drain(..).chain(q.background.drain(..)).collect()
        };
        self.shared.ready.notify_all();
        for job in cancelled {
            job.cancel();
        }
        self.threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn worker(shared: &Shared) {
    loop {
        let job = {
            let mut q = shared.queues.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if q.shutdown {
                    return;
                }
                if let Some(job) = q.demand.pop_front().or_else(|| q.background.pop_front()) {
                    break job;
                }
                q = shared.ready.wait(q).unwrap_or_else(|e| e.into_inner());
            }
        };
        // A panicking job must not take the worker with it: its waiters would
        // then only learn about it at their deadline, and the pool would shrink.
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job.run())).is_err() {
            error!("fetch job panicked");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    struct Send(mpsc::Sender<&'static str>, &'static str);
    impl Job for Send {
        fn run(self: Box<Self>) {
            self.0.send(self.1).unwrap();
        }
        fn cancel(self: Box<Self>) {
            self.0.send("cancelled").unwrap();
        }
    }

    struct Block(Arc<std::sync::Barrier>);
    impl Job for Block {
        fn run(self: Box<Self>) {
            self.0.wait();
            self.0.wait();
        }
        fn cancel(self: Box<Self>) {}
    }

    #[test]
    fn demand_jobs_run_before_queued_background_jobs() {
        let pool = WorkerPool::new(1).unwrap();
        let barrier = Arc::new(std::sync::Barrier::new(2));
        pool.submit(Priority::Demand, Box::new(Block(Arc::clone(&barrier))));
        barrier.wait(); // the only worker is now busy
        let (tx, rx) = mpsc::channel();
        pool.submit(
            Priority::Background,
            Box::new(Send(tx.clone(), "background")),
        );
        pool.submit(Priority::Demand, Box::new(Send(tx.clone(), "demand")));
        assert_eq!(pool.background_queued(), 1);
        barrier.wait();
        let timeout = std::time::Duration::from_secs(10);
        assert_eq!(rx.recv_timeout(timeout).unwrap(), "demand");
        assert_eq!(rx.recv_timeout(timeout).unwrap(), "background");
    }

    #[test]
    fn shutdown_cancels_queued_and_later_jobs() {
        let pool = WorkerPool::new(1).unwrap();
        let barrier = Arc::new(std::sync::Barrier::new(2));
        pool.submit(Priority::Demand, Box::new(Block(Arc::clone(&barrier))));
        barrier.wait();
        let (tx, rx) = mpsc::channel();
        pool.submit(Priority::Background, Box::new(Send(tx.clone(), "ran")));
        pool.shutdown();
        assert_eq!(rx.try_recv().unwrap(), "cancelled");
        pool.submit(Priority::Demand, Box::new(Send(tx, "ran")));
        assert_eq!(rx.try_recv().unwrap(), "cancelled");
        barrier.wait();
    }
}

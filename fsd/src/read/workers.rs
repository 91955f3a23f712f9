//! A fixed set of threads running fetch jobs, demand jobs before background
//! ones (readahead, prefetch), and background ones on at most a set number
//! of threads at once, so that readers always find a thread free soon.
//!
//! A thread runs a background job at a lower CPU priority (a niceness above
//! the one the daemon was started with), so that decompressing and
//! verifying chunks nobody waits for yet takes the CPU the starting
//! containers leave; a job raises its thread back ([`serve_waiting_reader`])
//! once a reader waits for one of its chunks. A queued background job a
//! reader waits for is run as a demand job, ahead of the others and outside
//! the background limit ([`WorkerPool::reader_waits`]).
//!
//! Backend calls block, so they run here rather than on the FUSE threads: a
//! reader waits for its chunks with a deadline and can give up even when a
//! backend call hangs.

use std::cell::Cell;
use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{error, info};

/// Work for the pool. `cancel` is called instead of `run` for jobs still
/// queued when the pool shuts down, so their waiters are answered.
pub trait Job: Send + 'static {
    fn run(self: Box<Self>);
    fn cancel(self: Box<Self>);
    /// Whether a reader waits for the job's results (a background job a
    /// reader has joined).
    fn is_wanted(&self) -> bool {
        false
    }
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
    /// Jobs being run right now, and how many of them are background ones.
    running: usize,
    running_background: usize,
    shutdown: bool,
}

struct Shared {
    queues: Mutex<Queues>,
    /// Background jobs that may run at once.
    background_limit: usize,
    /// Niceness added to a thread running a background job (0: none).
    background_nice: i32,
    ready: Condvar,
    /// Signalled when a job finishes.
    finished: Condvar,
}

pub struct WorkerPool {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl WorkerPool {
    /// `workers` threads, of which at most `background_limit` (at least
    /// one) run background jobs at any time, `background_nice` nicer than
    /// the others (a niceness [`usable_nice`] allows).
    pub fn new(
        workers: usize,
        background_limit: usize,
        background_nice: i32,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            queues: Mutex::new(Queues::default()),
            background_limit: background_limit.max(1),
            background_nice,
            ready: Condvar::new(),
            finished: Condvar::new(),
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

    /// Called when a reader starts waiting for a job that may be queued: an
    /// idle worker looks for a wanted background job to run.
    pub fn reader_waits(&self) {
        // Taking the lock orders the reader's mark before the worker's look,
        // and no worker is between its look and its wait meanwhile.
        drop(self.shared.queues.lock().unwrap_or_else(|e| e.into_inner()));
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

    /// Waits until fewer than `n` background jobs are queued; false once the
    /// pool shuts down.
    pub fn wait_for_background_room(&self, n: usize) -> bool {
        let mut q = self.shared.queues.lock().unwrap_or_else(|e| e.into_inner());
        while !q.shutdown && q.background.len() >= n {
            q = self
                .shared
                .finished
                .wait(q)
                .unwrap_or_else(|e| e.into_inner());
        }
        !q.shutdown
    }

    /// Cancels queued jobs, lets the workers exit after their current job,
    /// and waits up to `grace` for those jobs to finish (a backend call may
    /// be stuck until its own timeout; it is not waited for beyond `grace`).
    /// Returns whether every job finished in time.
    pub fn shutdown(&self, grace: Duration) -> bool {
        let cancelled: Vec<_> = {
            let mut q = self.shared.queues.lock().unwrap_or_else(|e| e.into_inner());
            q.shutdown = true;
            let q = &mut *q;
            q.demand.drain(..).chain(q.background.drain(..)).collect()
        };
        self.shared.ready.notify_all();
        self.shared.finished.notify_all();
        for job in cancelled {
            job.cancel();
        }
        let deadline = Instant::now() + grace;
        let mut q = self.shared.queues.lock().unwrap_or_else(|e| e.into_inner());
        while q.running > 0 {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            q = self
                .shared
                .finished
                .wait_timeout(q, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        drop(q);
        // Workers exit on their own; joining could wait on a stuck backend call.
        self.threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        true
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        self.shutdown(Duration::ZERO);
    }
}

fn worker(shared: &Shared) {
    loop {
        let (job, background) = {
            let mut q = shared.queues.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if q.shutdown {
                    return;
                }
                if let Some(job) = q.demand.pop_front() {
                    q.running += 1;
                    break (job, false);
                }
                // A background job a reader waits for is a demand job now.
                if let Some(at) = q.background.iter().position(|j| j.is_wanted()) {
                    if let Some(job) = q.background.remove(at) {
                        q.running += 1;
                        break (job, false);
                    }
                }
                if q.running_background < shared.background_limit {
                    if let Some(job) = q.background.pop_front() {
                        q.running += 1;
                        q.running_background += 1;
                        break (job, true);
                    }
                }
                q = shared.ready.wait(q).unwrap_or_else(|e| e.into_inner());
            }
        };
        set_nice_above_base(if background {
            shared.background_nice
        } else {
            0
        });
        // A panicking job must not take the worker with it: its waiters would
        // then only learn about it at their deadline, and the pool would shrink.
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job.run())).is_err() {
            error!("fetch job panicked");
        }
        let mut q = shared.queues.lock().unwrap_or_else(|e| e.into_inner());
        q.running -= 1;
        if background {
            q.running_background -= 1;
            // A worker idle because of the limit may take the next one.
            shared.ready.notify_one();
        }
        drop(q);
        shared.finished.notify_all();
    }
}

thread_local! {
    /// The niceness the thread started with (the daemon's), read on first use.
    static BASE_NICE: i32 = thread_nice();
    /// How much nicer than that the thread is now.
    static ABOVE_BASE: Cell<i32> = const { Cell::new(0) };
}

/// Called by a running job when a reader waits for one of its chunks: its
/// thread gets back the daemon's priority for the rest of the job.
pub fn serve_waiting_reader() {
    set_nice_above_base(0);
}

/// How much nicer than the daemon the calling thread is.
pub fn nice_above_base() -> i32 {
    ABOVE_BASE.with(Cell::get)
}

/// Makes the calling thread `above` nicer than it started, at most 19.
pub(crate) fn set_nice_above_base(above: i32) {
    if ABOVE_BASE.with(Cell::get) != above {
        let base = BASE_NICE.with(|b| *b);
        if renice_thread((base + above).min(19)).is_ok() {
            ABOVE_BASE.with(|a| a.set(above));
        }
    }
}

/// `above` if a thread may be made that much nicer and given its niceness
/// back, else 0 (logged): background work runs at normal priority then.
/// Asked once per daemon: the answer holds for all its threads.
pub fn usable_nice(above: u8) -> i32 {
    let above = i32::from(above);
    if above > 0 && !can_renice(above) {
        info!(
            background_nice = above,
            "no right to raise a thread's priority again (CAP_SYS_NICE); background fetches run at normal priority"
        );
        return 0;
    }
    above
}

/// Whether a thread may be made `above` nicer and given its niceness back;
/// tried on a thread of its own.
pub(crate) fn can_renice(above: i32) -> bool {
    std::thread::spawn(move || {
        let base = thread_nice();
        renice_thread((base + above).min(19)).is_ok() && renice_thread(base).is_ok()
    })
    .join()
    .unwrap_or(false)
}

/// The calling thread's niceness (getpriority(2); 0 if it fails).
pub(crate) fn thread_nice() -> i32 {
    nix::errno::Errno::clear();
    // SAFETY: gettid has no preconditions; getpriority takes integers.
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) };
    if nice == -1 && nix::errno::Errno::last_raw() != 0 {
        0
    } else {
        nice
    }
}

/// setpriority(2) on the calling thread: on Linux a thread id names one
/// thread, and niceness is per thread. (std and nix offer no way to set a
/// thread's niceness.)
fn renice_thread(nice: i32) -> std::io::Result<()> {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    // SAFETY: plain syscall with integer arguments.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
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
        let pool = WorkerPool::new(1, 1, 0).unwrap();
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
    fn background_jobs_leave_threads_to_demand_jobs() {
        let pool = WorkerPool::new(2, 1, 0).unwrap();
        let barrier = Arc::new(std::sync::Barrier::new(2));
        pool.submit(Priority::Background, Box::new(Block(Arc::clone(&barrier))));
        barrier.wait(); // one worker runs the background job
        let (tx, rx) = mpsc::channel();
        pool.submit(
            Priority::Background,
            Box::new(Send(tx.clone(), "background")),
        );
        pool.submit(Priority::Demand, Box::new(Send(tx.clone(), "demand")));
        let timeout = std::time::Duration::from_secs(10);
        assert_eq!(rx.recv_timeout(timeout).unwrap(), "demand");
        // The second background job waits for the first one.
        assert!(rx
            .recv_timeout(std::time::Duration::from_millis(50))
            .is_err());
        assert_eq!(pool.background_queued(), 1);
        barrier.wait();
        assert_eq!(rx.recv_timeout(timeout).unwrap(), "background");
        assert!(pool.wait_for_background_room(1));
    }

    /// Sends the niceness of the thread that runs it.
    struct Nice(mpsc::Sender<i32>);
    impl Job for Nice {
        fn run(self: Box<Self>) {
            self.0.send(thread_nice()).unwrap();
        }
        fn cancel(self: Box<Self>) {}
    }

    #[test]
    fn background_jobs_run_nicer_than_demand_jobs() {
        if !can_renice(10) {
            eprintln!("skipped: this process may not raise a thread's priority again (needs root or CAP_SYS_NICE)");
            return;
        }
        // One thread runs all three jobs, in turn. It starts with this
        // thread's niceness.
        let base = thread_nice();
        let pool = WorkerPool::new(1, 1, 10).unwrap();
        let (tx, rx) = mpsc::channel();
        let timeout = std::time::Duration::from_secs(10);
        for (priority, nice) in [
            (Priority::Background, (base + 10).min(19)),
            (Priority::Demand, base),
            (Priority::Background, (base + 10).min(19)),
        ] {
            pool.submit(priority, Box::new(Nice(tx.clone())));
            assert_eq!(rx.recv_timeout(timeout).unwrap(), nice, "{priority:?}");
        }
        // Turned off, background jobs run at the daemon's niceness.
        let pool = WorkerPool::new(1, 1, 0).unwrap();
        pool.submit(Priority::Background, Box::new(Nice(tx)));
        assert_eq!(rx.recv_timeout(timeout).unwrap(), base);
    }

    #[test]
    fn shutdown_cancels_queued_and_later_jobs() {
        let pool = WorkerPool::new(1, 1, 0).unwrap();
        let barrier = Arc::new(std::sync::Barrier::new(2));
        pool.submit(Priority::Demand, Box::new(Block(Arc::clone(&barrier))));
        barrier.wait();
        let (tx, rx) = mpsc::channel();
        pool.submit(Priority::Background, Box::new(Send(tx.clone(), "ran")));
        // The blocked job cannot finish within the grace period.
        assert!(!pool.shutdown(std::time::Duration::from_millis(10)));
        assert_eq!(rx.try_recv().unwrap(), "cancelled");
        pool.submit(Priority::Demand, Box::new(Send(tx, "ran")));
        assert_eq!(rx.try_recv().unwrap(), "cancelled");
        barrier.wait();
        assert!(
            pool.shutdown(std::time::Duration::from_secs(10)),
            "running job not seen finishing"
        );
    }
}

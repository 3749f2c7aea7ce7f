//! When a worker whose target completes inline (`mem:`, `null:`) hands
//! completions back to the guest in the middle of a batch: the rule
//! ([`MidBatch`], [`mid_batch_policy`]) and, on a worker with a thread of
//! its own, the trials that pick between per-request completions and the
//! rule's ([`CadenceTrial`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// When a worker whose target completes inline (`mem:`, `null:`) hands the
/// completions of a deep batch back to the guest.
#[derive(Clone, Debug)]
pub enum MidBatch {
    /// After every this many requests (0: at the end of the batch only).
    Every(usize),
    /// [`mid_batch_policy`] over the worker threads running at the start of
    /// each batch.
    WhileACpuIsFree {
        /// The device's worker threads that are running (not asleep).
        running: Arc<RunningWorkers>,
        /// CPUs the process may run on.
        cpus: usize,
    },
}

impl MidBatch {
    /// `VHOST_ISER_MID_BATCH` if set, else [`MidBatch::WhileACpuIsFree`].
    pub fn from_env_or_auto(running: Arc<RunningWorkers>, cpus: usize) -> MidBatch {
        match mid_batch_from_env() {
            Some(n) => MidBatch::Every(n),
            None => MidBatch::WhileACpuIsFree { running, cpus },
        }
    }

    /// After how many requests this batch's completions go back (0: at
    /// its end only).
    pub fn now(&self) -> usize {
        match self {
            MidBatch::Every(n) => *n,
            MidBatch::WhileACpuIsFree { running, cpus } => mid_batch_policy(running.count(), *cpus),
        }
    }
}

pub(crate) fn mid_batch_from_env() -> Option<usize> {
    static FROM_ENV: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    *FROM_ENV.get_or_init(|| {
        std::env::var("VHOST_ISER_MID_BATCH")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
    })
}

/// How many of a device's worker threads are running: inside an event
/// (a pass, a ring watch), not asleep in their epoll. Alone on its cache
/// line: it changes when a thread wakes or sleeps, and is read once per
/// batch by every worker.
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct RunningWorkers(std::sync::atomic::AtomicUsize);

impl RunningWorkers {
    /// Counts the calling thread as running until the guard is dropped.
    pub fn enter(&self) -> RunningGuard<'_> {
        self.0.fetch_add(1, Ordering::Relaxed);
        RunningGuard(self)
    }

    /// Threads running now.
    pub fn count(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

/// A running worker thread ([`RunningWorkers::enter`]).
#[derive(Debug)]
pub struct RunningGuard<'a>(&'a RunningWorkers);

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Every 8 requests while the running worker threads leave a CPU free, only
/// at the end of a batch when there are at least as many running as CPUs.
///
/// A completion handed back in the middle of a batch lets the guest reap
/// and refill while the worker goes on, which pays when the guest's thread
/// runs on another CPU (one queue, depth 32: 1.57M IOPS against 1.0M with
/// completions at the end of the batch only; 8 gave a fifth more than 16).
/// When every CPU has a worker on it, the guest thread that the signal
/// wakes preempts a worker instead, and each signal in the middle of a
/// batch costs two context switches: 4 queues on 4 threads on 2 CPUs, depth
/// 128, 3.2M IOPS at 0.39 us of backend CPU per I/O with 8, 5.0M at 0.30 us
/// with completions at the end of the batch. Counted among the running, not
/// the configured, threads: a device with four queues whose guest keeps one
/// busy has one worker running, and keeps the mid-batch completions.
pub fn mid_batch_policy(worker_threads: usize, cpus: usize) -> usize {
    if worker_threads >= cpus {
        0
    } else {
        8
    }
}

/// How long each of the two cadences runs in a trial.
const TRIAL_WINDOW: Duration = Duration::from_millis(10);

/// How long the winner of a trial is kept before the next trial, when it
/// differs from the previous winner. Each trial that confirms the winner
/// doubles this, up to [`MAX_SETTLE`]: a trial runs the losing cadence for
/// one window, and a steady guest should not pay for it often (10 ms in
/// 270 cost one queue at depth 128 some 4 % of its IOPS).
const SETTLE: Duration = Duration::from_millis(250);

/// The longest a winner is kept without a trial: how long a guest whose
/// depth changed may wait for the cadence to follow.
const MAX_SETTLE: Duration = Duration::from_secs(2);

/// A window whose batches spread over more than this (the worker slept:
/// the guest went idle or paused) measured the guest's pauses, not the
/// cadence: the trial is dropped.
const STALE_WINDOW: Duration = Duration::from_millis(40);

/// A window with fewer requests than this measured too little to judge.
const MIN_TRIAL_REQUESTS: u64 = 256;

/// Per-request completions must take this many times the requests per
/// second of the rule's cadence to be kept: they cost a used-index store
/// and an event-idx check per request, and the guest more wake-ups.
const PER_REQUEST_MARGIN: f64 = 1.1;

/// Where a [`CadenceTrial`] stands.
#[derive(Clone, Copy, Debug, PartialEq)]
enum TrialPhase {
    /// No batch yet: the first one starts a trial.
    Unstarted,
    /// The last trial's winner is kept until [`SETTLE`] has passed.
    Settled,
    /// The first window: per-request completions.
    PerRequest,
    /// The second window: the rule's cadence, after per-request completions
    /// took this many requests per second.
    Rule { per_request_rate: f64 },
}

/// Picks, by measuring both, between completions handed back after every
/// request and the rule's cadence (every 8), for one worker with a thread
/// of its own and an inline target.
///
/// Why: with one queue, which cadence wins depends on the guest's depth,
/// which the ring does not show. A guest that keeps 8 to 32 requests in
/// flight finds a completion each time it looks when they go back one by
/// one, and keeps submitting instead of sleeping until the next signal:
/// one queue, depth 32, 2.1M IOPS against 1.55M (depth 8: 1.97M against
/// 0.43M). At depth 64 and 128 the every-8 cadence wins (2.5M against
/// 2.0M, 3.0M against 2.1M). Rules that guessed the depth from a batch's
/// size or from how long the ring watch waited were wrong often enough to
/// lose a fifth at depth 64 or 128 (bench/RESULTS.md); a trial measures
/// what each cadence does with this guest, now.
///
/// A trial runs each cadence for [`TRIAL_WINDOW`] and compares the
/// requests taken per second of wall time; the winner is kept for
/// [`SETTLE`] (longer while trials keep confirming it), then the next
/// trial starts. Ties go to the rule's cadence.
#[derive(Clone, Debug)]
pub struct CadenceTrial {
    phase: TrialPhase,
    /// The cadence kept while settled: true for per-request completions.
    per_request: bool,
    /// When the phase began (its first batch).
    since: Option<Instant>,
    /// Requests taken since the phase began.
    requests: u64,
    /// How long the current winner is kept ([`SETTLE`] up to [`MAX_SETTLE`]).
    settle_for: Duration,
}

impl Default for CadenceTrial {
    fn default() -> Self {
        CadenceTrial {
            phase: TrialPhase::Unstarted,
            per_request: false,
            since: None,
            requests: 0,
            settle_for: SETTLE,
        }
    }
}

impl CadenceTrial {
    /// Counts the requests a batch took from the ring.
    #[inline]
    pub fn took(&mut self, requests: u64) {
        self.requests += requests;
    }

    /// Whether the batch starting at `now` hands completions back after
    /// every request (true) or at the rule's cadence (false).
    pub fn per_request(&mut self, now: Instant) -> bool {
        let since = match self.since {
            Some(since) if self.phase != TrialPhase::Unstarted => since,
            _ => {
                self.begin(TrialPhase::PerRequest, now);
                return true;
            }
        };
        let elapsed = now.saturating_duration_since(since);
        match self.phase {
            TrialPhase::Settled if elapsed >= self.settle_for => {
                self.begin(TrialPhase::PerRequest, now);
                true
            }
            TrialPhase::Settled | TrialPhase::Unstarted => self.per_request,
            TrialPhase::PerRequest if elapsed < TRIAL_WINDOW => true,
            TrialPhase::PerRequest => match self.rate(elapsed) {
                Some(per_request_rate) => {
                    self.begin(TrialPhase::Rule { per_request_rate }, now);
                    false
                }
                None => self.settle(self.per_request, now),
            },
            TrialPhase::Rule { .. } if elapsed < TRIAL_WINDOW => false,
            TrialPhase::Rule { per_request_rate } => match self.rate(elapsed) {
                Some(rule_rate) => {
                    let per_request = per_request_rate > rule_rate * PER_REQUEST_MARGIN;
                    self.settle_for = if per_request == self.per_request {
                        (self.settle_for * 2).min(MAX_SETTLE)
                    } else {
                        SETTLE
                    };
                    log::debug!(
                        "mid-batch trial: per-request {per_request_rate:.0}/s, every-n {rule_rate:.0}/s: keeping {}",
                        if per_request { "per-request" } else { "every-n" }
                    );
                    self.settle(per_request, now)
                }
                None => self.settle(self.per_request, now),
            },
        }
    }

    /// Requests per second over the phase that ran `elapsed`, if it
    /// measured enough to judge by.
    fn rate(&self, elapsed: Duration) -> Option<f64> {
        (elapsed <= STALE_WINDOW && self.requests >= MIN_TRIAL_REQUESTS)
            .then(|| self.requests as f64 / elapsed.as_secs_f64())
    }

    fn begin(&mut self, phase: TrialPhase, now: Instant) {
        self.phase = phase;
        self.since = Some(now);
        self.requests = 0;
    }

    fn settle(&mut self, per_request: bool, now: Instant) -> bool {
        self.per_request = per_request;
        self.begin(TrialPhase::Settled, now);
        per_request
    }
}

/// A worker's choice of when inline completions go back during a batch:
/// its [`MidBatch`] rule, and the trials that may switch the rule's
/// cadence to per-request completions.
#[derive(Clone, Debug)]
pub struct MidBatchChoice {
    rule: MidBatch,
    /// Trials run: the automatic rule, on a worker with a thread of its
    /// own (a thread shared by several queues measures them all at once,
    /// and there per-request completions lost a quarter at depth 32).
    trials: bool,
    trial: Box<CadenceTrial>,
}

impl MidBatchChoice {
    /// The choice under `rule`, with trials where the rule is automatic.
    pub fn new(rule: MidBatch) -> Self {
        MidBatchChoice {
            trials: matches!(rule, MidBatch::WhileACpuIsFree { .. }),
            rule,
            trial: Box::default(),
        }
    }

    /// The worker's thread serves other queues too: no trials.
    pub fn set_shares_thread(&mut self, shares: bool) {
        self.trials = !shares && matches!(self.rule, MidBatch::WhileACpuIsFree { .. });
    }

    /// After how many requests the completions of the batch starting at
    /// `now` go back (0: at its end only).
    #[inline]
    pub fn for_batch(&mut self, now: Instant) -> usize {
        let n = self.rule.now();
        if n == 0 || !self.trials {
            n
        } else if self.trial.per_request(now) {
            1
        } else {
            n
        }
    }

    /// Counts the requests a batch took from the ring.
    #[inline]
    pub fn took(&mut self, requests: u64) {
        self.trial.took(requests);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Completions go back mid-batch while the running worker threads leave
    /// a CPU free, and the running threads are counted by their guards.
    #[test]
    fn completions_go_back_mid_batch_only_with_a_cpu_to_spare() {
        assert_eq!(mid_batch_policy(1, 2), 8);
        assert_eq!(mid_batch_policy(3, 8), 8);
        assert_eq!(mid_batch_policy(1, 1), 0);
        assert_eq!(mid_batch_policy(2, 2), 0);
        assert_eq!(mid_batch_policy(4, 2), 0);

        // Counted among the running threads, at the start of each batch.
        let running = Arc::new(RunningWorkers::default());
        let auto = MidBatch::WhileACpuIsFree {
            running: running.clone(),
            cpus: 2,
        };
        assert_eq!(auto.now(), 8);
        let first = running.enter();
        assert_eq!(auto.now(), 8);
        {
            let _second = running.enter();
            assert_eq!(running.count(), 2);
            assert_eq!(auto.now(), 0);
        }
        assert_eq!(auto.now(), 8);
        drop(first);
        assert_eq!(running.count(), 0);
        assert_eq!(MidBatch::Every(3).now(), 3);
    }

    /// Runs one batch of `n` requests at `at` ms after `t0`; returns whether
    /// it had per-request completions.
    fn batch(t: &mut CadenceTrial, t0: Instant, at: u64, n: u64) -> bool {
        let per_request = t.per_request(t0 + Duration::from_millis(at));
        t.took(n);
        per_request
    }

    /// A trial keeps per-request completions where they take more requests
    /// per second, for SETTLE, then tries again.
    #[test]
    fn a_trial_keeps_per_request_completions_that_win() {
        let t0 = Instant::now();
        let mut t = CadenceTrial::default();
        // The first batch starts a trial with per-request completions.
        assert!(batch(&mut t, t0, 0, 1000));
        assert!(batch(&mut t, t0, 5, 1000));
        // The second window: the rule's cadence, half as fast.
        assert!(!batch(&mut t, t0, 10, 500));
        assert!(!batch(&mut t, t0, 15, 500));
        // Per-request won (2000 against 1000 in 10 ms): kept.
        assert!(batch(&mut t, t0, 20, 100));
        assert!(batch(&mut t, t0, 269, 100));
        // SETTLE is up: a new trial; this time the rule's cadence wins.
        assert!(batch(&mut t, t0, 270, 1000));
        assert!(!batch(&mut t, t0, 280, 3000));
        assert!(!batch(&mut t, t0, 290, 10));
        assert!(!batch(&mut t, t0, 539, 10));
    }

    /// Each trial that confirms the winner doubles the time to the next, up
    /// to MAX_SETTLE; a new winner brings it back to SETTLE.
    #[test]
    fn a_confirmed_winner_is_tried_less_often() {
        let t0 = Instant::now();
        let mut t = CadenceTrial::default();
        // Trials at 0, 520 (after 500), 1540 (after 1000), 3560 (after
        // 2000), 5580 (after 2000): every-n wins each (and wins the first
        // against the initial every-n as well).
        for (start, settled_until) in [(0, 520), (520, 1540), (1540, 3560), (3560, 5580)] {
            assert!(batch(&mut t, t0, start, 1000), "trial at {start}");
            assert!(!batch(&mut t, t0, start + 10, 2000));
            assert!(!batch(&mut t, t0, start + 20, 0));
            assert!(
                !batch(&mut t, t0, settled_until - 1, 0),
                "settled at {start}"
            );
        }
        // Per-request wins at 5580: back to SETTLE.
        assert!(batch(&mut t, t0, 5580, 3000));
        assert!(!batch(&mut t, t0, 5590, 1000));
        assert!(batch(&mut t, t0, 5600, 0));
        assert!(batch(&mut t, t0, 5849, 0));
        assert!(batch(&mut t, t0, 5850, 1000), "a trial starts after SETTLE");
        assert!(!batch(&mut t, t0, 5860, 0));
    }

    /// Per-request completions need a clear win; a tie keeps the rule's.
    #[test]
    fn a_tie_goes_to_the_rules_cadence() {
        let t0 = Instant::now();
        let mut t = CadenceTrial::default();
        assert!(batch(&mut t, t0, 0, 1050));
        assert!(!batch(&mut t, t0, 10, 1000));
        assert!(!batch(&mut t, t0, 20, 10));
    }

    /// A window the worker slept through, or one with too few requests to
    /// judge, ends the trial with the previous winner kept.
    #[test]
    fn a_trial_over_an_idle_guest_keeps_the_previous_cadence() {
        let t0 = Instant::now();
        let mut t = CadenceTrial::default();
        assert!(batch(&mut t, t0, 0, 1000));
        assert!(!batch(&mut t, t0, 10, 300));
        assert!(batch(&mut t, t0, 20, 0)); // settled on per-request
                                           // The next trial: the per-request window spans an idle second.
        assert!(batch(&mut t, t0, 270, 1000));
        assert!(batch(&mut t, t0, 1270, 5)); // dropped, previous kept
        assert!(batch(&mut t, t0, 1500, 5));
        // The next trial: too few requests in the rule's window.
        assert!(batch(&mut t, t0, 1520, 1000));
        assert!(!batch(&mut t, t0, 1530, 100));
        assert!(batch(&mut t, t0, 1540, 0));
    }

    /// Trials run only for the automatic rule on a thread of the worker's
    /// own, and only while the rule itself completes mid-batch.
    #[test]
    fn trials_only_where_the_rule_is_automatic_and_the_thread_its_own() {
        let t0 = Instant::now();
        let mut fixed = MidBatchChoice::new(MidBatch::Every(8));
        assert_eq!(fixed.for_batch(t0), 8);
        let running = Arc::new(RunningWorkers::default());
        let auto = MidBatch::WhileACpuIsFree {
            running: running.clone(),
            cpus: 2,
        };
        let mut own = MidBatchChoice::new(auto.clone());
        assert_eq!(own.for_batch(t0), 1, "a trial starts with per-request");
        let mut shared = MidBatchChoice::new(auto);
        shared.set_shares_thread(true);
        assert_eq!(shared.for_batch(t0), 8);
        // Every CPU busy with a worker: end of batch only, trial or not.
        let _a = running.enter();
        let _b = running.enter();
        assert_eq!(own.for_batch(t0), 0);
    }
}

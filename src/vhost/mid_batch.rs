//! When a worker whose target completes inline (`mem:`, `null:`) hands
//! completions back to the guest in the middle of a batch: the rule
//! ([`MidBatch`], [`mid_batch_policy`]) and, on a worker with a thread of
//! its own, the trials that pick the cadence ([`CadenceTrial`]).

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
        EVERY
    }
}

/// The cadences a trial runs, in this order: completions handed back after
/// every request, after every [`EVERY`], after every 32.
pub const CADENCES: [usize; 3] = [1, EVERY, 32];

/// The cadence kept before any trial has judged, and the one
/// [`mid_batch_policy`] gives while a CPU is free.
pub const EVERY: usize = 8;

/// How long each cadence runs in a trial.
const TRIAL_WINDOW: Duration = Duration::from_millis(10);

/// When the first trial starts, after the first batch: a guest's first
/// milliseconds of I/O (the driver starting, a benchmark ramping up) are
/// not what it does next.
const FIRST_TRIAL: Duration = Duration::from_millis(100);

/// How long the winner of a trial is kept before the next trial, when it
/// differs from the previous winner. Each trial that confirms the winner
/// doubles this, up to [`MAX_SETTLE`]: a trial runs the losing cadences
/// for a window each, and a steady guest should not pay for that often.
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

/// Another cadence must take this many times the requests per second of
/// the kept one to replace it. Windows of 10 ms vary by some 5-10 % at one
/// queue, depth 128; the differences worth a switch are 7 % (8 against 32
/// at depth 128) to 4x (1 against 8 at depth 8), and a switch between
/// cadences within noise of each other costs nothing.
const SWITCH_MARGIN: f64 = 1.05;

/// Where a [`CadenceTrial`] stands.
#[derive(Clone, Copy, Debug, PartialEq)]
enum TrialPhase {
    /// The last trial's winner is kept until `settle_for` has passed.
    Settled,
    /// Measuring `CADENCES[i]`.
    Window(usize),
}

/// Picks, by measuring each, among the [`CADENCES`] at which completions
/// go back during a batch, for one worker with a thread of its own and an
/// inline target.
///
/// Why: with one queue, which cadence wins depends on the guest's depth,
/// which the ring does not show. A guest that keeps 8 to 32 requests in
/// flight finds a completion each time it looks when they go back one by
/// one, and keeps submitting instead of sleeping until the next signal:
/// one queue, depth 32, 1.97M IOPS against 1.52M every 8 (depth 8: 1.78M
/// against 0.44M). At depth 64 every 8 wins (2.5M against 2.0M with 1 and
/// 2.1M with 32), at depth 128 every 32 (3.0M against 2.8M with 8 and
/// 2.1M with 1). Rules that guessed the depth from a batch's size or from
/// how long the ring watch waited were wrong often enough to lose a fifth
/// at depth 64 or 128 (bench/RESULTS.md); a trial measures what each
/// cadence does with this guest, now.
///
/// A trial runs each cadence for [`TRIAL_WINDOW`] and compares the
/// requests taken per second of wall time; the fastest replaces the kept
/// one if it beats it by [`SWITCH_MARGIN`]. The winner is kept for
/// [`SETTLE`] (longer while trials keep confirming it), then the next trial
/// starts.
#[derive(Clone, Debug)]
pub struct CadenceTrial {
    phase: TrialPhase,
    /// Index in [`CADENCES`] of the cadence kept while settled.
    kept: usize,
    /// Requests per second of each cadence in the current trial.
    rates: [f64; CADENCES.len()],
    /// When the phase began (its first batch).
    since: Option<Instant>,
    /// Requests taken since the phase began.
    requests: u64,
    /// How long the current winner is kept ([`SETTLE`] up to [`MAX_SETTLE`];
    /// [`FIRST_TRIAL`] until a trial has judged: a dropped trial leaves it
    /// as it was).
    settle_for: Duration,
}

impl Default for CadenceTrial {
    fn default() -> Self {
        CadenceTrial {
            phase: TrialPhase::Settled,
            kept: 1,
            rates: [0.0; CADENCES.len()],
            since: None,
            requests: 0,
            settle_for: FIRST_TRIAL,
        }
    }
}

impl CadenceTrial {
    /// Counts the requests a batch took from the ring.
    #[inline]
    pub fn took(&mut self, requests: u64) {
        self.requests += requests;
    }

    /// After how many requests the completions of the batch starting at
    /// `now` go back.
    pub fn cadence(&mut self, now: Instant) -> usize {
        let Some(since) = self.since else {
            // The first batch: the first trial comes FIRST_TRIAL later.
            return self.settle(self.kept, now);
        };
        let elapsed = now.saturating_duration_since(since);
        match self.phase {
            TrialPhase::Settled if elapsed >= self.settle_for => self.window(0, now),
            TrialPhase::Settled => CADENCES[self.kept],
            TrialPhase::Window(i) if elapsed < TRIAL_WINDOW => CADENCES[i],
            TrialPhase::Window(i) => {
                let Some(rate) = self.rate(elapsed) else {
                    // Dropped: the guest paused, or did too little to judge.
                    return self.settle(self.kept, now);
                };
                self.rates[i] = rate;
                if i + 1 < CADENCES.len() {
                    return self.window(i + 1, now);
                }
                self.judge(now)
            }
        }
    }

    /// Ends a trial whose windows all measured: keeps the fastest cadence
    /// if it beats the kept one by the margin.
    fn judge(&mut self, now: Instant) -> usize {
        let fastest = (0..CADENCES.len())
            .max_by(|&a, &b| self.rates[a].total_cmp(&self.rates[b]))
            .unwrap_or(self.kept);
        let winner = if self.rates[fastest] > self.rates[self.kept] * SWITCH_MARGIN {
            fastest
        } else {
            self.kept
        };
        self.settle_for = if winner == self.kept {
            (self.settle_for * 2).clamp(SETTLE, MAX_SETTLE)
        } else {
            SETTLE
        };
        log::debug!(
            "mid-batch trial: requests/s every {:?}: {:.0?}: keeping every {}",
            CADENCES,
            self.rates,
            CADENCES[winner]
        );
        self.settle(winner, now)
    }

    /// Ends a trial under way, keeping the cadence kept before it; the
    /// next trial comes after the same wait.
    pub fn drop_trial(&mut self, now: Instant) {
        if matches!(self.phase, TrialPhase::Window(_)) {
            self.settle(self.kept, now);
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

    fn window(&mut self, i: usize, now: Instant) -> usize {
        self.begin(TrialPhase::Window(i), now);
        CADENCES[i]
    }

    fn settle(&mut self, kept: usize, now: Instant) -> usize {
        self.kept = kept;
        self.begin(TrialPhase::Settled, now);
        CADENCES[kept]
    }
}

/// A worker's choice of when inline completions go back during a batch:
/// its [`MidBatch`] rule, and the trials that pick the cadence while the
/// rule hands completions back during a batch.
#[derive(Clone, Debug)]
pub struct MidBatchChoice {
    rule: MidBatch,
    /// The worker's thread serves other queues too.
    shares_thread: bool,
    /// The worker's target completes inline (only those complete during a
    /// batch).
    inline_target: bool,
    /// Trials run: the automatic rule, an inline target, a worker with a
    /// thread of its own (a thread shared by several queues measures them
    /// all at once, and there per-request completions lost a quarter at
    /// depth 32, four queues on one thread).
    trials: bool,
    /// Boxed: it is touched once per batch, and kept inline it spread the
    /// worker's per-request fields over more cache lines (one queue, QD128,
    /// A/B with the cadence fixed at 8: -4 % inline, -2 % boxed).
    trial: Box<CadenceTrial>,
}

impl MidBatchChoice {
    /// The choice under `rule` for a worker whose target completes inline
    /// or not, with trials where the rule is automatic and the target
    /// inline.
    pub fn new(rule: MidBatch, inline_target: bool) -> Self {
        let mut choice = MidBatchChoice {
            rule,
            shares_thread: false,
            inline_target,
            trials: false,
            trial: Box::default(),
        };
        choice.set_shares_thread(false);
        choice
    }

    /// The worker's thread serves other queues too: no trials.
    pub fn set_shares_thread(&mut self, shares: bool) {
        self.shares_thread = shares;
        self.trials =
            !shares && self.inline_target && matches!(self.rule, MidBatch::WhileACpuIsFree { .. });
    }

    /// After how many requests the completions of the batch starting at
    /// `now` go back (0: at its end only).
    #[inline]
    pub fn for_batch(&mut self, now: Instant) -> usize {
        let n = self.rule.now();
        if !self.trials {
            n
        } else if n == 0 {
            // A window that went on at the end-of-batch cadence would
            // credit its rate to the cadence it was measuring.
            self.trial.drop_trial(now);
            n
        } else {
            self.trial.cadence(now)
        }
    }

    /// Counts the requests a batch took from the ring.
    #[inline]
    pub fn took(&mut self, requests: u64) {
        if self.trials {
            self.trial.took(requests);
        }
    }

    /// Requests counted in the trial's current phase.
    #[cfg(test)]
    pub fn counted(&self) -> u64 {
        self.trial.requests
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

    /// Runs one batch of `n` requests at `at` ms after `t0`; returns its
    /// cadence.
    fn batch(t: &mut CadenceTrial, t0: Instant, at: u64, n: u64) -> usize {
        let cadence = t.cadence(t0 + Duration::from_millis(at));
        t.took(n);
        cadence
    }

    /// Runs a trial from `start` ms with `requests` taken in each window
    /// (10 ms each); returns the cadence kept after it.
    fn trial(t: &mut CadenceTrial, t0: Instant, start: u64, requests: [u64; 3]) -> usize {
        for (i, n) in requests.into_iter().enumerate() {
            let at = start + 10 * i as u64;
            assert_eq!(batch(t, t0, at, n), CADENCES[i], "window {i} at {at}");
        }
        batch(t, t0, start + 30, 0)
    }

    /// A trial that has had its first batch at t0; the first trial is due
    /// at 100 ms.
    fn started(t0: Instant) -> CadenceTrial {
        let mut t = CadenceTrial::default();
        assert_eq!(batch(&mut t, t0, 0, 1000), EVERY);
        assert_eq!(batch(&mut t, t0, 99, 1000), EVERY);
        t
    }

    /// A trial keeps the cadence that takes the most requests per second,
    /// for SETTLE, then tries again.
    #[test]
    fn a_trial_keeps_the_fastest_cadence() {
        let t0 = Instant::now();
        let mut t = started(t0);
        // Per-request completions win the first trial.
        assert_eq!(trial(&mut t, t0, 100, [2000, 1000, 900]), 1);
        assert_eq!(batch(&mut t, t0, 379, 100), 1);
        // SETTLE is up: a new trial; this time every 32 wins.
        assert_eq!(trial(&mut t, t0, 380, [1000, 2800, 3000]), 32);
        assert_eq!(batch(&mut t, t0, 659, 10), 32);
        // And then every 8.
        assert_eq!(trial(&mut t, t0, 660, [1000, 3000, 2000]), 8);
    }

    /// Another cadence must beat the kept one by the margin.
    #[test]
    fn the_kept_cadence_stays_unless_another_clearly_wins() {
        let t0 = Instant::now();
        let mut t = started(t0);
        // Every 8 is kept at first: 4 % faster is not enough.
        assert_eq!(trial(&mut t, t0, 100, [1040, 1000, 1000]), 8);
        // Every 32 wins by more than the margin; then 8 is within it.
        assert_eq!(trial(&mut t, t0, 380, [1000, 1000, 1100]), 32);
        assert_eq!(trial(&mut t, t0, 660, [1000, 1100, 1080]), 32);
    }

    /// Each trial that confirms the winner doubles the time to the next, up
    /// to MAX_SETTLE; a new winner brings it back to SETTLE.
    #[test]
    fn a_confirmed_winner_is_tried_less_often() {
        let t0 = Instant::now();
        let mut t = started(t0);
        // Every 8 wins each trial (the first against the initial 8 as
        // well): the next comes after 250, 500, 1000, 2000 and 2000 ms.
        let mut start = 100;
        for settle in [250, 500, 1000, 2000, 2000] {
            assert_eq!(trial(&mut t, t0, start, [1000, 2000, 1000]), 8);
            let next = start + 30 + settle;
            assert_eq!(batch(&mut t, t0, next - 1, 0), 8, "settled after {start}");
            start = next;
        }
        // Per-request completions win: back to SETTLE.
        assert_eq!(trial(&mut t, t0, start, [3000, 1000, 1000]), 1);
        assert_eq!(batch(&mut t, t0, start + 279, 0), 1);
        assert_eq!(batch(&mut t, t0, start + 280, 1000), 1, "a trial starts");
        assert_eq!(batch(&mut t, t0, start + 290, 1000), 8);
    }

    /// A window the worker slept through, or one with too few requests to
    /// judge, ends the trial with the previous winner kept.
    #[test]
    fn a_trial_over_an_idle_guest_keeps_the_previous_cadence() {
        let t0 = Instant::now();
        let mut t = started(t0);
        assert_eq!(trial(&mut t, t0, 100, [2000, 1000, 1000]), 1);
        // The next trial: its first window spans an idle second.
        assert_eq!(batch(&mut t, t0, 380, 1000), 1);
        assert_eq!(batch(&mut t, t0, 1380, 5), 1); // dropped, 1 kept
        assert_eq!(batch(&mut t, t0, 1629, 5), 1);
        // The next trial: too few requests in the window of every 8.
        assert_eq!(batch(&mut t, t0, 1630, 1000), 1);
        assert_eq!(batch(&mut t, t0, 1640, 100), 8);
        assert_eq!(batch(&mut t, t0, 1650, 0), 1);
    }

    /// Trials run only for the automatic rule, an inline target and a
    /// thread of the worker's own, and only while the rule itself completes
    /// mid-batch.
    #[test]
    fn trials_only_where_the_rule_is_automatic_and_the_thread_its_own() {
        let t0 = Instant::now();
        let first_trial = t0 + FIRST_TRIAL;
        let running = Arc::new(RunningWorkers::default());
        let auto = MidBatch::WhileACpuIsFree {
            running: running.clone(),
            cpus: 2,
        };
        let mut fixed = MidBatchChoice::new(MidBatch::Every(8), true);
        let mut shared = MidBatchChoice::new(auto.clone(), true);
        shared.set_shares_thread(true);
        let mut network = MidBatchChoice::new(auto.clone(), false);
        for choice in [&mut fixed, &mut shared, &mut network] {
            assert_eq!(choice.for_batch(t0), EVERY);
            choice.took(1000);
            assert_eq!(choice.for_batch(first_trial), EVERY, "no trial");
            assert_eq!(choice.counted(), 0, "nothing counted without trials");
        }
        let mut own = MidBatchChoice::new(auto, true);
        assert_eq!(own.for_batch(t0), EVERY);
        assert_eq!(
            own.for_batch(first_trial),
            1,
            "a trial starts with per-request"
        );
        assert_eq!(
            own.for_batch(first_trial + TRIAL_WINDOW),
            EVERY,
            "a window with nothing measured: every 8 kept"
        );
        // Every CPU busy with a worker: end of batch only, trial or not.
        let _a = running.enter();
        let _b = running.enter();
        assert_eq!(own.for_batch(t0), 0);
    }

    /// A trial under way ends, the kept cadence with it, when the rule
    /// turns to end-of-batch completions: its window would credit those
    /// batches to the cadence it measures.
    #[test]
    fn a_trial_ends_when_the_rule_stops_mid_batch_completions() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let running = Arc::new(RunningWorkers::default());
        let mut own = MidBatchChoice::new(
            MidBatch::WhileACpuIsFree {
                running: running.clone(),
                cpus: 1,
            },
            true,
        );
        assert_eq!(own.for_batch(ms(0)), EVERY);
        assert_eq!(own.for_batch(ms(100)), 1, "the first trial");
        own.took(5000);
        {
            let _busy = running.enter();
            assert_eq!(own.for_batch(ms(105)), 0);
            own.took(5000);
        }
        // Dropped: every 8 kept, the next trial 100 ms after the drop.
        assert_eq!(own.for_batch(ms(110)), EVERY);
        assert_eq!(own.for_batch(ms(204)), EVERY);
        assert_eq!(own.for_batch(ms(205)), 1, "the next trial");
    }
}

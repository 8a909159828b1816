//! The log's way out of the process: a thread that logs appends its line to a shared buffer and
//! goes on; a writer thread of its own writes what has gathered, one system call per batch.
//!
//! Before, every line was a `write` to stdout from the thread that logged, under stdout's lock:
//! a system call per request on the hot path, and with two actix workers a contended lock (a
//! futex wait and wake for about every other request, `strace -c` under `scripts/bench`). Waking
//! the writer for every line (a group commit) was no better: the wake-up is a system call and a
//! context switch too. So the writer, woken by the first line after a quiet spell, lets lines
//! gather for [`GATHER`] (or until [`WRITE_AT`] bytes) and writes them in one call: at most one
//! wake-up and one write per batch, whatever the load. (tracing-appender's `non_blocking` moves the
//! writes to a thread too, but hands it one line per message through a channel and writes each
//! to stdout on its own: the syscall per line stays.)
//!
//! What it costs: a line reaches stdout up to [`GATHER`] after it was logged. [`flush`] writes
//! everything logged so far; the command line calls it before the process exits and the panic
//! hook before the panic message. A SIGKILL (or an abort) loses the last [`GATHER`] of lines.
//!
//! [`flush`]: LogWriter::flush

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// How long lines gather before they are written.
pub const GATHER: Duration = Duration::from_millis(20);
/// A batch this big is written without waiting for the rest of [`GATHER`].
const WRITE_AT: usize = 256 * 1024;
/// Beyond this many bytes waiting, a thread that logs waits for the writer, as a blocking write
/// would: when stdout is slower than the log (a stalled pipe), memory stays bounded.
const MAX_PENDING: usize = 4 * 1024 * 1024;
/// How long [`LogWriter::flush`] waits for the writer: a stdout nobody reads must not hang exit.
const FLUSH_WAIT: Duration = Duration::from_secs(2);

/// The handle given to the log subscriber (`MakeWriter`) and kept for [`LogWriter::flush`].
#[derive(Clone)]
pub struct LogWriter {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    /// The writer thread waits here: for a first line, or for the batch to gather.
    writer_wake: Condvar,
    /// Threads over [`MAX_PENDING`], and `flush`, wait here for a batch to be written.
    batch_written: Condvar,
}

#[derive(Default)]
struct State {
    pending: Vec<u8>,
    phase: Phase,
    /// Write the gathering batch now (it is big, or someone flushes).
    write_now: bool,
    /// Batches taken by the writer, and written: a flush waits for the batch holding its lines.
    batches_taken: u64,
    batches_written: u64,
    /// Threads waiting on `batch_written` (the writer wakes them only when there are some).
    waiting_for_batch: usize,
}

#[derive(Default, PartialEq, Eq)]
enum Phase {
    /// Nothing pending: the writer sleeps until a line comes.
    #[default]
    Idle,
    /// Lines are gathering for [`GATHER`].
    Gathering,
    /// A batch is being written.
    Writing,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; a poisoned one still holds consistent bytes.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl LogWriter {
    /// Starts the writer thread, writing to `out`. `None` when the thread cannot be started.
    pub fn spawn(out: impl Write + Send + 'static) -> Option<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            writer_wake: Condvar::new(),
            batch_written: Condvar::new(),
        });
        let writer = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || write_batches(&writer, out))
            .ok()?;
        Some(Self { shared })
    }

    /// Queues one or more whole lines.
    pub(super) fn append(&self, bytes: &[u8]) {
        let mut state = self.shared.lock();
        while state.pending.len() >= MAX_PENDING {
            state.waiting_for_batch += 1;
            state = self
                .shared
                .batch_written
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
            state.waiting_for_batch -= 1;
        }
        state.pending.extend_from_slice(bytes);
        // A notification is a system call: only the first line of a batch wakes the writer,
        // and the line that makes the batch big cuts its gathering short.
        let wake = match state.phase {
            Phase::Idle => {
                state.phase = Phase::Gathering;
                true
            }
            Phase::Gathering if !state.write_now && state.pending.len() >= WRITE_AT => {
                state.write_now = true;
                true
            }
            Phase::Gathering | Phase::Writing => false,
        };
        if wake {
            drop(state);
            self.shared.writer_wake.notify_one();
        }
    }

    /// Returns once everything logged before the call is written (or after [`FLUSH_WAIT`]).
    pub fn flush(&self) {
        let mut state = self.shared.lock();
        let target = if state.pending.is_empty() {
            state.batches_taken
        } else {
            state.batches_taken + 1
        };
        if state.batches_written >= target {
            return;
        }
        state.write_now = true;
        self.shared.writer_wake.notify_one();
        state.waiting_for_batch += 1;
        let (mut state, _) = self
            .shared
            .batch_written
            .wait_timeout_while(state, FLUSH_WAIT, |state| state.batches_written < target)
            .unwrap_or_else(PoisonError::into_inner);
        state.waiting_for_batch -= 1;
    }
}

/// The writer thread: waits for a line, lets more gather, writes them all in one call; again.
fn write_batches(shared: &Shared, mut out: impl Write) {
    const KEEP_CAPACITY: usize = 64 * 1024;
    let mut batch = Vec::with_capacity(KEEP_CAPACITY);
    loop {
        {
            let mut state = shared.lock();
            while state.pending.is_empty() {
                state.phase = Phase::Idle;
                state = shared
                    .writer_wake
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            state.phase = Phase::Gathering;
            let (mut state, _) = shared
                .writer_wake
                .wait_timeout_while(state, GATHER, |state| !state.write_now)
                .unwrap_or_else(PoisonError::into_inner);
            state.write_now = false;
            state.phase = Phase::Writing;
            std::mem::swap(&mut state.pending, &mut batch);
            state.batches_taken += 1;
        }
        // A log that cannot be written has nowhere to report it: the lines are dropped.
        let _ = out.write_all(&batch).and_then(|()| out.flush());
        batch.clear();
        if batch.capacity() > 8 * KEEP_CAPACITY {
            // A burst grew the buffer: give the memory back.
            batch = Vec::with_capacity(KEEP_CAPACITY);
        }
        let mut state = shared.lock();
        state.batches_written += 1;
        if state.waiting_for_batch > 0 {
            drop(state);
            shared.batch_written.notify_all();
        }
    }
}

/// One log line on its way: what the subscriber writes into (`write_all` of the whole line).
pub struct LogLine<'a>(&'a LogWriter);

impl Write for LogLine<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.append(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogLine<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LogLine(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An `out` the test can read, and slow down.
    #[derive(Clone, Default)]
    struct Sink {
        bytes: Arc<Mutex<Vec<u8>>>,
        writes: Arc<Mutex<usize>>,
        delay: Duration,
    }

    impl Write for Sink {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            std::thread::sleep(self.delay);
            self.bytes.lock().unwrap().extend_from_slice(bytes);
            *self.writes.lock().unwrap() += 1;
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn flush_returns_after_every_line_logged_before_it_is_written_in_order() {
        let sink = Sink::default();
        let writer = LogWriter::spawn(sink.clone()).unwrap();
        for n in 0..1000 {
            writeln!(LogLine(&writer), "line {n}").unwrap();
        }
        writer.flush();
        let text = String::from_utf8(sink.bytes.lock().unwrap().clone()).unwrap();
        let expected: String = (0..1000).map(|n| format!("line {n}\n")).collect();
        assert_eq!(text, expected);
        // An idle writer: a flush with nothing pending returns at once.
        writer.flush();
    }

    #[test]
    fn lines_from_many_threads_stay_whole_and_a_slow_out_gets_them_in_batches() {
        let sink = Sink {
            delay: Duration::from_millis(2),
            ..Sink::default()
        };
        let writer = LogWriter::spawn(sink.clone()).unwrap();
        std::thread::scope(|scope| {
            for thread in 0..4 {
                let writer = writer.clone();
                scope.spawn(move || {
                    for n in 0..500 {
                        let mut line = LogLine(&writer);
                        line.write_all(format!("thread {thread} line {n}\n").as_bytes())
                            .unwrap();
                    }
                });
            }
        });
        writer.flush();
        let text = String::from_utf8(sink.bytes.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 2000);
        for thread in 0..4 {
            let numbers: Vec<usize> = text
                .lines()
                .filter_map(|line| line.strip_prefix(&format!("thread {thread} line ")))
                .map(|n| n.parse().unwrap())
                .collect();
            assert_eq!(numbers, (0..500).collect::<Vec<_>>(), "thread {thread}");
        }
        let writes = *sink.writes.lock().unwrap();
        assert!(
            writes < 500,
            "2,000 lines against a 2 ms write took {writes} writes: not batched"
        );
    }

    #[test]
    fn a_stalled_out_bounds_memory_and_flush_gives_up() {
        let sink = Sink {
            delay: Duration::from_secs(30),
            ..Sink::default()
        };
        let writer = LogWriter::spawn(sink).unwrap();
        writeln!(LogLine(&writer), "first").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        // The writer is stuck in a 30 s write: lines pile up to the bound, no further.
        let line = vec![b'x'; 1023];
        for _ in 0..(MAX_PENDING / 1024) {
            let mut bytes = line.clone();
            bytes.push(b'\n');
            LogLine(&writer).write_all(&bytes).unwrap();
        }
        assert!(writer.shared.lock().pending.len() <= MAX_PENDING);
        let started = std::time::Instant::now();
        writer.flush();
        let waited = started.elapsed();
        assert!(
            waited >= FLUSH_WAIT && waited < FLUSH_WAIT + Duration::from_secs(10),
            "flush waited {waited:?}"
        );
    }
}

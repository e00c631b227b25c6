//! Where log lines wait to be written: memory each thread appends its own
//! lines to, and a background thread that writes what has gathered in one
//! system call.
//!
//! The gateway logs a line per request, so the hand-off is on the hot path.
//! `tracing-appender`'s non-blocking writer, which this replaces, sends each
//! line through a channel as its own allocation, and its thread wakes and
//! writes per line whenever it keeps up. Here a line is a `memcpy` into its
//! thread's own slot under a lock no other thread takes but the writer,
//! every [`EVERY`]; a slot that fills hands its [`HAND_OFF`] bytes on at
//! once, as a buffer (the slot takes an emptied one), and the writer writes
//! a batch of buffers with one `writev`.
//! The thread sleeps while nothing waits; the first line wakes it, and it
//! writes [`EVERY`] later whatever has gathered by then: at most one wake-up
//! and one write per [`EVERY`], however busy the gateway. One shared buffer
//! for every line, which the slots replace, cost 1 % of the cache hits on
//! one core (each line went to memory the writer had just flushed), and
//! copying slots into one buffer 2 % more.

use std::cell::RefCell;
use std::io::{IoSlice, Write};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

/// How long lines gather after the first one: short enough that they show
/// up at once to a person watching, and that a batch's write is short. The
/// write runs on a core the requests need too (on a one-core gateway, the
/// only one), and holds them up while it copies: at 130k lines a second, a
/// 20 ms batch (about 650 KB) raised the hit p99 from 1.0 to 2.2 ms.
const EVERY: Duration = Duration::from_millis(5);
/// A slot this full hands its lines on to the writer's buffer at once.
const HAND_OFF: usize = 16 * 1024;
/// How long an exit waits for the last lines to be written: an output that
/// takes longer (a pipe nobody reads) would otherwise hold the exit forever.
const FINAL_WRITE: Duration = Duration::from_secs(1);

/// Lines not yet written. Cloned handles share it.
#[derive(Clone)]
pub struct LineWriter(Arc<Shared>);

struct Shared {
    /// Unique in the process, so a thread's slot is found for its writer.
    id: u64,
    pending: Mutex<Pending>,
    wake: Condvar,
    /// Every thread's slot: a line is appended to its own thread's.
    slots: Mutex<Vec<Arc<Slot>>>,
    /// Bytes allowed to wait; past this, lines are dropped.
    limit: usize,
    /// `pending`'s length, read without its lock when a line is pushed.
    waiting: AtomicUsize,
    dropped: AtomicU64,
}

#[derive(Default)]
struct Pending {
    /// Slots' lines as handed on, oldest first: whole buffers, not copies.
    chunks: Vec<Vec<u8>>,
    /// Their total length.
    bytes: usize,
    /// Emptied buffers for slots to take in exchange for theirs.
    spare: Vec<Vec<u8>>,
    /// A slot has lines the writer has not taken yet.
    in_slots: bool,
    /// The writer waits for a first line, with nothing to write: the only
    /// time a line wakes it. While a batch gathers, a wake-up would cut the
    /// batch short and switch threads on the request path's core.
    asleep: bool,
    closed: bool,
}

/// Emptied buffers kept for reuse, at most: enough for a busy batch.
const SPARE: usize = 64;

/// One thread's lines not yet handed on, oldest first.
type Slot = Mutex<Vec<u8>>;

thread_local! {
    /// This thread's slot in each writer it has written to (one, in the binary).
    static MY_SLOTS: RefCell<Vec<(u64, Arc<Slot>)>> = const { RefCell::new(Vec::new()) };
}

/// Writes what is still waiting, then stops the writer thread, when dropped;
/// waits at most `FINAL_WRITE` (1 s) for that.
#[must_use = "dropping the guard stops the writer"]
pub struct FlushGuard {
    shared: Arc<Shared>,
    /// Disconnects when the writer thread has ended.
    ended: mpsc::Receiver<()>,
}

impl LineWriter {
    /// Starts the thread that writes to `out`. At most `limit` bytes wait:
    /// when `out` falls that far behind (a stalled pipe, a full disk), lines
    /// are dropped and counted rather than making a request wait.
    pub fn spawn(out: impl Write + Send + 'static, limit: usize) -> (LineWriter, FlushGuard) {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let shared = Arc::new(Shared {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            pending: Mutex::new(Pending::default()),
            wake: Condvar::new(),
            slots: Mutex::new(Vec::new()),
            limit,
            waiting: AtomicUsize::new(0),
            dropped: AtomicU64::new(0),
        });
        let (ending, ended) = mpsc::channel::<()>();
        {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("log-writer".into())
                .spawn(move || {
                    let _ending = ending;
                    shared.write_out(out);
                })
                .expect("spawning the log writer thread");
        }
        let guard = FlushGuard {
            shared: shared.clone(),
            ended,
        };
        (LineWriter(shared), guard)
    }

    /// Queues one whole line (or several), never waiting on the output.
    pub fn push(&self, line: &[u8]) {
        let shared = &self.0;
        MY_SLOTS.with_borrow_mut(|mine| {
            let slot = match mine.iter().find(|(id, _)| *id == shared.id) {
                Some((_, slot)) => slot,
                None => {
                    let slot = Arc::new(Slot::default());
                    shared.slots.lock().push(slot.clone());
                    mine.push((shared.id, slot));
                    &mine[mine.len() - 1].1
                }
            };
            let mut bytes = slot.lock();
            let waiting = shared.waiting.load(Ordering::Relaxed) + bytes.len();
            if waiting + line.len() > shared.limit {
                drop(bytes);
                shared.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            let first = bytes.is_empty();
            bytes.extend_from_slice(line);
            if bytes.len() >= HAND_OFF.min(shared.limit) {
                shared.hand_off(&mut bytes);
            } else if first {
                // The writer may be asleep with nothing pending.
                let mut pending = shared.pending.lock();
                if !pending.in_slots {
                    pending.in_slots = true;
                    if pending.asleep {
                        shared.wake.notify_one();
                    }
                }
            }
        });
    }

    /// Bytes not yet taken by the writer thread: pending, and in slots.
    #[cfg(test)]
    fn waiting_bytes(&self) -> usize {
        let in_slots: usize = self.0.slots.lock().iter().map(|s| s.lock().len()).sum();
        self.0.pending.lock().bytes + in_slots
    }

    /// Lines dropped so far because the output fell behind.
    pub fn dropped(&self) -> u64 {
        self.0.dropped.load(Ordering::Relaxed)
    }
}

impl Shared {
    /// Moves a slot's lines to the writer's buffer. With the slot's lock
    /// held, so a thread's lines keep their order.
    fn hand_off(&self, slot: &mut Vec<u8>) {
        let mut pending = self.pending.lock();
        // The slot's buffer itself moves on, and the slot takes an emptied
        // one: nothing is copied, and the few buffers in turn stay in cache.
        let spare = pending.spare.pop().unwrap_or_default();
        let full = std::mem::replace(slot, spare);
        pending.bytes += full.len();
        pending.chunks.push(full);
        self.waiting.store(pending.bytes, Ordering::Relaxed);
        if pending.asleep {
            self.wake.notify_one();
        }
    }

    /// Hands every slot's lines on, and forgets the slots of threads gone.
    fn gather(&self) {
        let mut slots = self.slots.lock();
        self.pending.lock().in_slots = false;
        for slot in slots.iter() {
            let mut bytes = slot.lock();
            if !bytes.is_empty() {
                self.hand_off(&mut bytes);
            }
        }
        // Only this list holds the slot of a thread that has ended; one that
        // ended after its slot was emptied above may have left lines since.
        slots.retain(|slot| Arc::strong_count(slot) > 1 || !slot.lock().is_empty());
    }

    fn write_out(&self, mut out: impl Write) {
        let mut batch: Vec<Vec<u8>> = Vec::new();
        loop {
            let closed = {
                let mut pending = self.pending.lock();
                while pending.chunks.is_empty() && !pending.in_slots && !pending.closed {
                    pending.asleep = true;
                    self.wake.wait(&mut pending);
                    pending.asleep = false;
                }
                // A batch gathers; only closing wakes this wait early.
                if !pending.closed {
                    self.wake.wait_for(&mut pending, EVERY);
                }
                pending.closed
            };
            self.gather();
            {
                let mut pending = self.pending.lock();
                std::mem::swap(&mut pending.chunks, &mut batch);
                pending.bytes = 0;
                self.waiting.store(0, Ordering::Relaxed);
            }
            if !batch.is_empty() {
                // One system call for the whole batch. Nowhere to report a
                // failed log write; the lines are lost, as they would be
                // with the output gone.
                let mut slices: Vec<IoSlice> = batch.iter().map(|c| IoSlice::new(c)).collect();
                let _ = write_all_vectored(&mut out, &mut slices).and_then(|()| out.flush());
                let mut pending = self.pending.lock();
                for mut chunk in batch.drain(..) {
                    if pending.spare.len() < SPARE {
                        chunk.clear();
                        pending.spare.push(chunk);
                    }
                }
            }
            if closed {
                return;
            }
        }
    }
}

/// `Write::write_all` for several buffers at once (std's is not stable yet).
pub fn write_all_vectored(
    out: &mut impl Write,
    mut bufs: &mut [IoSlice<'_>],
) -> std::io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match out.write_vectored(bufs) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl Drop for FlushGuard {
    fn drop(&mut self) {
        self.shared.pending.lock().closed = true;
        self.shared.wake.notify_one();
        // Disconnected once the thread has written the rest and ended.
        let _ = self.ended.recv_timeout(FINAL_WRITE);
    }
}

/// Each `write` is one whole line: tracing's formatter writes an event with
/// a single `write_all`.
impl Write for LineWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// An output that reports each write and can be held up.
    struct Sink {
        written: mpsc::Sender<Vec<u8>>,
        gate: Option<mpsc::Receiver<()>>,
    }

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if let Some(gate) = &self.gate {
                // Held until the test lets it go (or drops the sender).
                let _ = gate.recv();
            }
            // The test may be over (the writer outlives a stuck exit).
            let _ = self.written.send(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn sink(gate: Option<mpsc::Receiver<()>>) -> (Sink, mpsc::Receiver<Vec<u8>>) {
        let (written, seen) = mpsc::channel();
        (Sink { written, gate }, seen)
    }

    #[test]
    fn a_lone_line_is_written_without_waiting_for_a_batch() {
        let (out, seen) = sink(None);
        let (writer, _guard) = LineWriter::spawn(out, 1 << 20);
        writer.push(b"one line\n");
        let written = seen.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(written, b"one line\n");
    }

    #[test]
    fn every_line_is_written_in_order_by_the_time_the_guard_is_dropped() {
        let (out, seen) = sink(None);
        let (writer, guard) = LineWriter::spawn(out, 1 << 20);
        let lines: Vec<String> = (0..5000).map(|i| format!("line {i}\n")).collect();
        for line in &lines {
            writer.push(line.as_bytes());
        }
        drop(guard);
        let written: Vec<u8> = seen.try_iter().flatten().collect();
        assert_eq!(String::from_utf8(written).unwrap(), lines.concat());
        assert_eq!(writer.dropped(), 0);
    }

    #[test]
    fn a_full_slot_does_not_cut_the_batch_short() {
        let (out, seen) = sink(None);
        let (writer, _guard) = LineWriter::spawn(out, 1 << 20);
        let state = |check: fn(&Pending) -> bool| {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !check(&writer.0.pending.lock()) {
                assert!(std::time::Instant::now() < deadline, "writer stuck");
                std::thread::yield_now();
            }
        };
        state(|p| p.asleep);
        let first = std::time::Instant::now();
        writer.push(b"first\n");
        // Awake again means in its gathering wait: it clears the flag and
        // waits again under one hold of the lock.
        state(|p| !p.asleep);
        writer.push(&vec![b'x'; HAND_OFF]);
        let written = seen.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(written.starts_with(b"first\n"));
        assert!(
            first.elapsed() >= EVERY,
            "written {:?} after the first line",
            first.elapsed()
        );
    }

    #[test]
    fn each_threads_lines_are_written_in_order_even_after_it_ended() {
        let (out, seen) = sink(None);
        let (writer, guard) = LineWriter::spawn(out, 1 << 20);
        // Enough lines that every slot hands lines on before the writer
        // takes the rest; the threads have ended when the guard is dropped.
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let writer = writer.clone();
                std::thread::spawn(move || {
                    for i in 0..3000 {
                        writer.push(format!("t{t} {i}\n").as_bytes());
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        drop(guard);
        let written: Vec<u8> = seen.try_iter().flatten().collect();
        let written = String::from_utf8(written).unwrap();
        for t in 0..4 {
            let prefix = format!("t{t} ");
            let mine: Vec<&str> = written.lines().filter(|l| l.starts_with(&prefix)).collect();
            let expected: Vec<String> = (0..3000).map(|i| format!("t{t} {i}")).collect();
            let first_difference = mine.iter().zip(&expected).position(|(a, b)| a != b);
            assert!(
                mine.len() == expected.len() && first_difference.is_none(),
                "thread {t}: {} lines, first out of place at {first_difference:?}",
                mine.len()
            );
        }
        assert!(
            writer.0.slots.lock().is_empty(),
            "ended threads' slots are forgotten"
        );
    }

    #[test]
    fn a_stalled_output_drops_and_counts_lines_instead_of_blocking() {
        let (release, gate) = mpsc::channel();
        let (out, seen) = sink(Some(gate));
        let (writer, guard) = LineWriter::spawn(out, 100);
        // The first line reaches the writer, which then blocks in `write`.
        writer.push(b"first\n");
        let mut pushed = vec![b"first\n".to_vec()];
        // Wait for the writer to take it (nothing waits any more).
        while writer.waiting_bytes() > 0 {
            std::thread::yield_now();
        }
        // With the output stuck, 100 bytes may wait: 10 lines of 10 bytes fit,
        // the other 90 are dropped, and no push waits.
        for i in 0..100 {
            let line = format!("line {i:04}\n");
            if i < 10 {
                pushed.push(line.clone().into_bytes());
            }
            writer.push(line.as_bytes());
        }
        assert_eq!(writer.dropped(), 90);
        drop(release);
        drop(guard);
        let written: Vec<u8> = seen.try_iter().flatten().collect();
        assert_eq!(written, pushed.concat());
    }

    #[test]
    fn an_exit_waits_for_a_stuck_output_only_so_long() {
        let (_release, gate) = mpsc::channel::<()>();
        let (out, _seen) = sink(Some(gate));
        let (writer, guard) = LineWriter::spawn(out, 1 << 20);
        writer.push(b"never written\n");
        let started = std::time::Instant::now();
        drop(guard);
        let waited = started.elapsed();
        assert!(waited >= FINAL_WRITE, "{waited:?}");
        assert!(waited < FINAL_WRITE * 10, "{waited:?}");
    }
}

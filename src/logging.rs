//! The access line: one per request, so the hottest code in the gateway
//! after the socket.
//!
//! Through tracing-subscriber's formatter a line costs about a microsecond,
//! a fifth of a cache hit: every field goes through `fmt::write`, the level
//! is padded and the calendar date computed on every line, and the line is
//! built twice over before it reaches the writer. [`Access::log`] writes the
//! same bytes (tracing's plain text, `name=value` with values as `Debug`
//! prints them) straight to the log writer once the binary has handed it over
//! with [`write_access_lines_to`]; the date part of the timestamp is reused
//! within a second and numbers go through `itoa`. Until then, and for JSON
//! lines or a terminal, the line is an ordinary tracing event.
//! `RUST_LOG` decides either way. Every line, this one or tracing's, then
//! waits in a [`LineWriter`] for a background thread to scrub of secrets
//! and write it.

mod writer;

pub use writer::{write_all_vectored, FlushGuard, LineWriter};

use std::cell::{Cell, RefCell};
use std::fmt::Write as _;
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::Method;

/// The target of the per-request access line.
pub const ACCESS: &str = "progress_gateway::access";

/// Where access lines go when written directly: set once, by the binary.
static WRITER: OnceLock<LineWriter> = OnceLock::new();

/// From now on, access lines are formatted here and handed to `writer`, the
/// one tracing's other lines go to, rather than going through tracing's
/// formatter. Only for tracing's default plain-text format without colours.
pub fn write_access_lines_to(writer: LineWriter) {
    // A second call (there is none in the binary) keeps the first writer.
    let _ = WRITER.set(writer);
}

/// One request's access line.
pub struct Access<'a> {
    pub method: &'a Method,
    pub route: &'a str,
    pub project: &'a str,
    pub consumer: &'a str,
    pub status: u16,
    pub cache: &'a str,
    pub stale: &'a str,
    pub error: &'a str,
    pub latency_us: u64,
    pub request_id: &'a str,
}

impl Access<'_> {
    /// Writes the line, stamped `at`, if `RUST_LOG` lets
    /// `progress_gateway::access` log at `info`.
    pub fn log(&self, at: Instant) {
        if !tracing::enabled!(target: ACCESS, tracing::Level::INFO) {
            return;
        }
        let Some(writer) = WRITER.get() else {
            return self.event();
        };
        thread_local! {
            /// The line is put together here, then copied to the writer.
            static LINE: RefCell<String> = const { RefCell::new(String::new()) };
        }
        LINE.with_borrow_mut(|line| {
            line.clear();
            self.format(line, wall_clock(at));
            // Scrubbed on the way out, with every other line: a client may
            // send anything as its request id, a gateway secret included.
            writer.push(line.as_bytes());
        });
    }

    /// The line as a tracing event, which the subscriber formats.
    fn event(&self) {
        tracing::info!(
            target: ACCESS,
            method = %self.method,
            route = self.route,
            project = self.project,
            consumer = self.consumer,
            status = self.status,
            cache = self.cache,
            stale = self.stale,
            error = self.error,
            latency_us = self.latency_us,
            request_id = %self.request_id,
        );
    }

    /// The bytes tracing's plain-text format writes for [`Self::event`].
    fn format(&self, line: &mut String, now: SystemTime) {
        write_timestamp(line, now);
        thread_local! {
            static MIDDLE: RefCell<Middle> = RefCell::new(Middle::default());
        }
        MIDDLE.with_borrow_mut(|middle| {
            if !middle.is_for(self) {
                middle.set(self);
            }
            line.push_str(&middle.text);
        });
        line.push_str(itoa::Buffer::new().format(self.latency_us));
        line.push_str(" request_id=");
        line.push_str(self.request_id);
        line.push('\n');
    }
}

/// The part of an access line between the timestamp and the latency's
/// value, kept with what it was made of: it repeats from one request to the
/// next (a poller's hits), and comparing its fields costs less than writing
/// them out again, some twenty pieces each with a bounds check and a copy.
#[derive(Default)]
struct Middle {
    method: Method,
    status: u16,
    /// route, project, consumer, cache, stale, error.
    fields: [String; 6],
    text: String,
}

impl Middle {
    fn fields<'a>(access: &Access<'a>) -> [&'a str; 6] {
        [
            access.route,
            access.project,
            access.consumer,
            access.cache,
            access.stale,
            access.error,
        ]
    }

    fn is_for(&self, access: &Access) -> bool {
        self.method == *access.method
            && self.status == access.status
            && !self.text.is_empty()
            && self.fields == Self::fields(access)
    }

    fn set(&mut self, access: &Access) {
        self.method = access.method.clone();
        self.status = access.status;
        for (field, value) in self.fields.iter_mut().zip(Self::fields(access)) {
            field.clear();
            field.push_str(value);
        }
        let text = &mut self.text;
        text.clear();
        text.push_str("  INFO progress_gateway::access:");
        let mut status = itoa::Buffer::new();
        // (` name=`, value, whether `Debug` quotes it): the fields of `event`
        // up to the latency.
        for (name, value, quote) in [
            (" method=", access.method.as_str(), false),
            (" route=", access.route, true),
            (" project=", access.project, true),
            (" consumer=", access.consumer, true),
            (" status=", status.format(access.status), false),
            (" cache=", access.cache, true),
            (" stale=", access.stale, true),
            (" error=", access.error, true),
        ] {
            text.push_str(name);
            if quote {
                quoted(text, value);
            } else {
                text.push_str(value);
            }
        }
        text.push_str(" latency_us=");
    }
}

/// `value` quoted and escaped as `Debug` does.
fn quoted(line: &mut String, value: &str) {
    // `Debug` leaves printable ASCII but these two as it is.
    if value
        .bytes()
        .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\')
    {
        line.push('"');
        line.push_str(value);
        line.push('"');
    } else {
        // Writing to a String cannot fail.
        let _ = write!(line, "{value:?}");
    }
}

/// The wall-clock time at `at`, counted on from a reading of the system
/// clock taken at most a second before: the request has read the monotonic
/// clock already, and a line costs no second clock reading. A step of the
/// system clock shows within a second.
fn wall_clock(at: Instant) -> SystemTime {
    thread_local! {
        static ANCHOR: Cell<Option<(Instant, SystemTime)>> = const { Cell::new(None) };
    }
    ANCHOR.with(|anchor| match anchor.get() {
        Some((then, wall)) if at >= then && at - then < Duration::from_secs(1) => {
            wall + (at - then)
        }
        _ => {
            let wall = SystemTime::now();
            anchor.set(Some((at, wall)));
            wall
        }
    })
}

/// `YYYY-MM-DDTHH:MM:SS.ffffffZ` in UTC, as tracing's `SystemTime` writes it.
fn write_timestamp(line: &mut String, now: SystemTime) {
    thread_local! {
        /// The second last written and its text up to the dot: lines come
        /// many per second, the date changes once a day.
        static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    SECOND.with_borrow_mut(|(second, text)| {
        if *second != secs {
            *second = secs;
            // `YYYY-MM-DDTHH:MM:SSZ`, the `Z` turned into the dot.
            *text = humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs))
                .to_string();
            text.pop();
            text.push('.');
        }
        line.push_str(text);
    });
    let mut micros = since.subsec_micros();
    let mut digits = [b'0'; 6];
    for digit in digits.iter_mut().rev() {
        *digit = b'0' + (micros % 10) as u8;
        micros /= 10;
    }
    line.push_str(std::str::from_utf8(&digits).expect("digits"));
    line.push('Z');
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::field::MakeExt;

    fn stamp(secs: u64, micros: u32) -> String {
        let mut text = String::new();
        let at = UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros.into());
        write_timestamp(&mut text, at);
        text
    }

    #[test]
    fn the_wall_clock_counts_on_from_a_reading_at_most_a_second_old() {
        let (before, at) = (SystemTime::now(), Instant::now());
        let first = wall_clock(at);
        assert!(first >= before && first <= SystemTime::now());
        // Within the second: counted on from that reading, to the nanosecond.
        let later = Duration::from_millis(700);
        assert_eq!(wall_clock(at + later), first + later);
        // Past it: read again, so the system clock (here not moved on by two
        // seconds) is what counts.
        let read_again = wall_clock(at + Duration::from_secs(2));
        assert!(read_again < first + Duration::from_secs(1));
        assert!(read_again >= first);
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_microseconds() {
        assert_eq!(stamp(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(stamp(1_700_000_000, 123_456), "2023-11-14T22:13:20.123456Z");
        // A leap day, the day after, and the cached second reused then left.
        assert_eq!(stamp(1_709_164_800, 7), "2024-02-29T00:00:00.000007Z");
        assert_eq!(stamp(1_709_164_800, 999_999), "2024-02-29T00:00:00.999999Z");
        assert_eq!(stamp(1_709_251_199, 0), "2024-02-29T23:59:59.000000Z");
        assert_eq!(stamp(1_709_251_200, 0), "2024-03-01T00:00:00.000000Z");
        // 2100 is not a leap year, 2000 was.
        assert_eq!(stamp(4_107_542_400, 0), "2100-03-01T00:00:00.000000Z");
        assert_eq!(stamp(951_782_400, 0), "2000-02-29T00:00:00.000000Z");
    }

    /// A writer that keeps what it is given.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// What tracing writes for `access`'s event, set up as the binary sets
    /// it up for plain text.
    fn through_tracing(access: &Access) -> String {
        let out = Captured::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .fmt_fields(
                tracing_subscriber::fmt::format::debug_fn(|w, field, value| {
                    write!(w, "{field}={value:?}")
                })
                .delimited(" "),
            )
            .finish();
        tracing::subscriber::with_default(subscriber, || access.event());
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        text
    }

    #[test]
    fn access_lines_are_the_bytes_tracing_writes() {
        let plain = Access {
            method: &Method::GET,
            route: "roma",
            project: "0123456789abcdef0123456789abcdef",
            consumer: "-",
            status: 200,
            cache: "HIT",
            stale: "-",
            error: "-",
            latency_us: 1234,
            request_id: "0a1b2c3d4e5f60718293a4b5c6d7e8f9",
        };
        // Values Debug escapes, or leaves alone but a lazy check would not.
        let odd = Access {
            method: &Method::HEAD,
            project: "a \"quoted\" \\ name\t",
            consumer: "zoë ☃ 'single'",
            error: "back\\slash",
            stale: "quote\"only",
            status: 503,
            latency_us: 0,
            ..plain
        };
        // Each twice, the second time from the kept middle, with its own
        // latency and id; then the first again.
        let again = Access {
            latency_us: 98765,
            request_id: "again",
            ..plain
        };
        for access in [&plain, &plain, &odd, &odd, &again, &plain] {
            let reference = through_tracing(access);
            let mut line = String::new();
            access.format(&mut line, SystemTime::now());
            // The timestamps differ by when each was taken.
            assert_eq!(line[27..], reference[27..], "{line}{reference}");
            assert_eq!(line.as_bytes()[26], b'Z', "{line}");
        }
    }
}

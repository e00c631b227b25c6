//! How log lines are written: tracing's plain-text format, with the access
//! line (one per request, so the hottest code in the gateway after the
//! socket) formatted by hand.
//!
//! tracing-subscriber's formatter goes through `fmt::write` for every field,
//! pads the level, and computes the calendar date on every line: about a
//! microsecond per access line, a fifth of a cache hit. [`Lines`] writes the
//! same bytes directly (the timestamp's date part is reused within a second,
//! numbers go through `itoa`) and leaves every other line to tracing.

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The target of the per-request access line.
pub const ACCESS: &str = "progress_gateway::access";

/// A plain-text event format: `inner` for every line but access lines
/// outside any span, which it writes as `inner` would.
///
/// `inner` must be tracing-subscriber's default `Format` (full, system time,
/// no ANSI) with `name=value` fields (`value` in `Debug`) delimited by a
/// space: the unit tests compare both byte for byte.
pub struct Lines<F> {
    inner: F,
}

impl<F> Lines<F> {
    pub fn new(inner: F) -> Self {
        Lines { inner }
    }
}

impl<S, N, F> FormatEvent<S, N> for Lines<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        if meta.target() != ACCESS || writer.has_ansi_escapes() || ctx.event_scope().is_some() {
            return self.inner.format_event(ctx, writer, event);
        }
        thread_local! {
            /// The line is put together here and handed on in one call:
            /// `Writer` costs a dynamic call per piece.
            static LINE: RefCell<String> = const { RefCell::new(String::new()) };
        }
        LINE.with(|line| {
            // Taken already if a field's `Debug` logged: that line goes the slow way.
            let Ok(mut line) = line.try_borrow_mut() else {
                return self.inner.format_event(ctx, writer, event);
            };
            let line = &mut *line;
            line.clear();
            write_timestamp(line, SystemTime::now());
            // The level right-aligned in five columns, as tracing pads it.
            let level = meta.level().as_str();
            line.push_str(&"      "[..6 - level.len()]);
            line.push_str(level);
            line.push(' ');
            line.push_str(meta.target());
            line.push_str(": ");
            let mut fields = Fields { line, first: true };
            event.record(&mut fields);
            line.push('\n');
            writer.write_str(line)
        })
    }
}

/// Writes `name=value` pairs as `{name}={value:?}`, space-delimited.
struct Fields<'a> {
    line: &'a mut String,
    first: bool,
}

impl Fields<'_> {
    fn name(&mut self, field: &Field) -> &mut String {
        if !std::mem::take(&mut self.first) {
            self.line.push(' ');
        }
        self.line.push_str(field.name());
        self.line.push('=');
        self.line
    }
}

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        let line = self.name(field);
        // `Debug` for str quotes it and escapes only these; anything else
        // goes through `Debug` itself.
        if value
            .bytes()
            .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\')
        {
            line.push('"');
            line.push_str(value);
            line.push('"');
        } else {
            let _ = write!(line, "{value:?}");
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.name(field).push_str(itoa::Buffer::new().format(value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.name(field).push_str(itoa::Buffer::new().format(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.name(field)
            .push_str(if value { "true" } else { "false" });
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        // Writing to a String cannot fail.
        let _ = write!(self.name(field), "{value:?}");
    }
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
            text.clear();
            let (days, rest) = (secs / 86_400, secs % 86_400);
            let (year, month, day) = civil_from_days(days as i64);
            // Writing to a String cannot fail.
            let _ = write!(
                text,
                "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.",
                rest / 3600,
                rest / 60 % 60,
                rest % 60
            );
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

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard
/// Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;
    use tracing_subscriber::field::MakeExt;

    fn stamp(secs: u64, micros: u32) -> String {
        let mut text = String::new();
        let at = UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros.into());
        write_timestamp(&mut text, at);
        text
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

    /// Runs `emit` under a subscriber set up as the binary sets it up, with
    /// or without [`Lines`]; returns what it wrote, timestamps cut off.
    fn lines(fast: bool, emit: impl Fn()) -> Vec<String> {
        let out = Captured::default();
        let writer = out.clone();
        let builder = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .fmt_fields(
                tracing_subscriber::fmt::format::debug_fn(|w, field, value| {
                    write!(w, "{field}={value:?}")
                })
                .delimited(" "),
            );
        let subscriber: Box<dyn Subscriber + Send + Sync> = if fast {
            Box::new(
                builder
                    .event_format(Lines::new(tracing_subscriber::fmt::format()))
                    .finish(),
            )
        } else {
            Box::new(builder.finish())
        };
        tracing::subscriber::with_default(subscriber, emit);
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|line| {
                let (stamp, rest) = line.split_at(27);
                assert!(
                    stamp.ends_with('Z') && stamp.as_bytes()[19] == b'.',
                    "{line}"
                );
                rest.to_string()
            })
            .collect()
    }

    #[test]
    fn access_lines_are_written_as_tracing_writes_them() {
        let emit = || {
            let method = http::Method::GET;
            tracing::info!(
                target: ACCESS,
                method = %method,
                route = "roma",
                project = "0123456789abcdef",
                consumer = "a \"quoted\" \\ name\t",
                status = 200u16,
                cache = "HIT",
                stale = "-",
                error = "-",
                latency_us = 1234u64,
                negative = -5i64,
                flag = true,
                unicode = "zoë ☃",
                request_id = %"abc-123",
            );
            tracing::info!(target: ACCESS, error = %"refused", "request refused by the HTTP layer");
            tracing::warn!(request_id = %"x", "gateway error");
        };
        let (fast, reference) = (lines(true, emit), lines(false, emit));
        assert_eq!(fast.len(), 3);
        assert_eq!(fast, reference);
        assert!(fast[0].starts_with("  INFO progress_gateway::access: method=GET route=\"roma\""));
    }
}

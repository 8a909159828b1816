//! Logging: JSON lines (default, [`json`]) or human-readable, filtered by `RUST_LOG`, written to
//! stdout in batches by a thread of their own ([`writer`]), each line of a request with its
//! request ID.
//!
//! Spans are opened with `skip_all` throughout the crate and secrets are redacted types, so no
//! token, code, verifier, cookie or key can reach a log line.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use tracing::subscriber::Interest;
use tracing::Metadata;
use tracing_subscriber::filter::DynFilterFn;
use tracing_subscriber::layer::Context;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

mod json;
mod writer;

use json::{access_line, JsonLines, JsonMembers};
use writer::LogWriter;

/// The writer behind the global subscriber, kept so that [`flush`] can reach it (the subscriber
/// is process-global by nature; this is its one companion).
static LOG_WRITER: OnceLock<LogWriter> = OnceLock::new();

tokio::task_local! {
    /// The ID of the request a task is serving ([`with_request_id`]).
    static REQUEST_ID: String;
}

/// Set when JSON lines go to [`LOG_WRITER`] through the global subscriber: then
/// [`write_access_line`] writes access log lines there itself.
static ACCESS_LINES: OnceLock<&'static LogWriter> = OnceLock::new();

/// Whether lines are human-readable ([`LogFormat::Pretty`]): they carry the request ID in a span.
static PRETTY: AtomicBool = AtomicBool::new(false);

/// Set when shutdown has closed the listening socket while actix-server's accept thread still
/// watches it ([`listener_closed`]).
static LISTENER_CLOSED: AtomicBool = AtomicBool::new(false);

/// The target of actix-server's accept thread's events.
const ACCEPT_TARGET: &str = "actix_server::accept";

/// Says that shutdown closes the listening socket on purpose (see `startup`): the one error
/// actix-server's accept thread then logs ("Error accepting connection: Invalid argument") is
/// expected, not an alert, and is left out. Its other errors until then (say, out of file
/// descriptors) are still logged.
pub fn listener_closed() {
    LISTENER_CLOSED.store(true, Ordering::SeqCst);
}

/// Leaves out the accept thread's errors once [`listener_closed`] was called. Only that thread's
/// events are looked at one by one (their callsites' interest is "sometimes"); every other
/// callsite is left to `RUST_LOG` and cached as usual, so the filter costs the broker's own
/// events nothing.
fn expected_accept_errors<S>() -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber,
{
    DynFilterFn::new(|metadata: &Metadata<'_>, _: &Context<'_, S>| {
        !(metadata.target() == ACCEPT_TARGET
            && *metadata.level() == tracing::Level::ERROR
            && LISTENER_CLOSED.load(Ordering::SeqCst))
    })
    .with_callsite_filter(|metadata| {
        if metadata.target() == ACCEPT_TARGET {
            Interest::sometimes()
        } else {
            Interest::always()
        }
    })
}

/// Runs a request's future with its ID: every JSON line it logs carries `"request_id"`, from a
/// task-local rather than a tracing span (a span per request was ~8 % of a cached `/session`'s
/// instructions: made, its fields formatted and stored, entered and left at every poll, closed).
/// Human-readable lines keep the span (`request{request_id=…}`), which their formatter prints.
pub async fn with_request_id<F: Future>(id: String, future: F) -> F::Output {
    let span = if PRETTY.load(Ordering::Relaxed) {
        tracing::info_span!("request", request_id = id.as_str())
    } else {
        tracing::Span::none()
    };
    REQUEST_ID
        .scope(id, tracing::Instrument::instrument(future, span))
        .await
}

/// Installs the global subscriber; a second call (tests) is a no-op.
pub fn init(format: LogFormat) {
    match log_writer() {
        Some(writer) => {
            if install(format, writer.clone()) && matches!(format, LogFormat::Json) {
                let _ = ACCESS_LINES.set(writer);
            }
        }
        // No thread for the writer: lines go to stdout from the thread that logs them.
        None => {
            install(format, std::io::stdout);
        }
    }
}

/// Writes a response's access log line straight to the log writer: the line [`JsonLines`]
/// makes of `tracing::info!(target: target, method, route, status, latency_ms, "request")`
/// inside a request ([`with_request_id`]), with `latency_ms` to the microsecond. `false` when
/// lines are not JSON through the process's writer (human-readable ones, a test's subscriber):
/// the caller then logs the event through tracing. The caller checks that INFO is enabled.
///
/// Through tracing, this one line per request was ~5k instructions of a cached `/session`'s ~68k
/// (`scripts/profile`): the dispatch, a visitor call per field, a float printed shortest-first.
pub fn write_access_line(
    target: &str,
    method: &str,
    route: &str,
    status: u16,
    latency: Duration,
) -> bool {
    let Some(writer) = ACCESS_LINES.get() else {
        return false;
    };
    let mut line = String::with_capacity(256);
    access_line(
        &mut line,
        &chrono::Utc::now(),
        target,
        method,
        route,
        status,
        latency,
    );
    writer.append(line.as_bytes());
    true
}

/// A duration in milliseconds to the microsecond, as access log lines give it.
pub fn millis(elapsed: Duration) -> f64 {
    elapsed.as_micros() as f64 / 1000.0
}

/// Writes every line logged so far (the process is about to exit).
pub fn flush() {
    if let Some(writer) = LOG_WRITER.get() {
        writer.flush();
    }
}

/// The process's log writer, started on first use; `None` when its thread cannot be started.
fn log_writer() -> Option<&'static LogWriter> {
    if let Some(writer) = LOG_WRITER.get() {
        return Some(writer);
    }
    let writer = LogWriter::spawn(std::io::stdout())?;
    let mut first = false;
    let writer = LOG_WRITER.get_or_init(|| {
        first = true;
        writer
    });
    if first {
        // A panic's message goes to stderr directly: the lines logged before it must not stay
        // behind in the writer's buffer.
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            flush();
            previous(info);
        }));
    }
    Some(writer)
}

/// `true` when the subscriber became the global one.
fn install<W>(format: LogFormat, writer: W) -> bool
where
    W: for<'a> tracing_subscriber::fmt::MakeWriter<'a> + Send + Sync + 'static,
{
    PRETTY.store(matches!(format, LogFormat::Pretty), Ordering::Relaxed);
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    let installed = match format {
        LogFormat::Json => builder
            .fmt_fields(JsonMembers)
            .event_format(JsonLines)
            .finish()
            .with(expected_accept_errors())
            .try_init(),
        LogFormat::Pretty => builder.finish().with(expected_accept_errors()).try_init(),
    };
    installed.is_ok()
}

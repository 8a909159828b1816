//! The JSON form of log lines: one object per event, built in one buffer ([`JsonLines`],
//! [`JsonMembers`]), and the access line written without tracing's event machinery
//! ([`access_line`]), which is the same line.

use std::fmt::Write as _;
use std::time::Duration;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

use super::REQUEST_ID;

/// The access line of one response, as [`JsonLines`] writes the event
/// `info!(target: target, method, route, status, latency_ms, "request")` inside a request, with
/// `latency_ms` to the microsecond (numbers by `itoa`: `core::fmt` for them was a third of the line).
pub(super) fn access_line(
    line: &mut String,
    now: &chrono::DateTime<chrono::Utc>,
    target: &str,
    method: &str,
    route: &str,
    status: u16,
    latency: Duration,
) {
    line.push_str("{\"timestamp\":\"");
    crate::rfc3339::push(line, now, chrono::SecondsFormat::Micros);
    line.push_str("\",\"level\":\"INFO\",\"message\":\"request\",\"method\":");
    push_json_str(line, method);
    line.push_str(",\"route\":");
    push_json_str(line, route);
    let mut number = itoa::Buffer::new();
    line.push_str(",\"status\":");
    line.push_str(number.format(status));
    line.push_str(",\"latency_ms\":");
    let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
    line.push_str(number.format(micros / 1000));
    // Three decimals, zeros kept: 1000..=1999 without its leading 1.
    line.push('.');
    line.push_str(&number.format(1000 + micros % 1000)[1..]);
    let _ = REQUEST_ID.try_with(|id| {
        line.push_str(",\"request_id\":");
        push_json_str(line, id);
    });
    line.push_str(",\"target\":");
    push_json_str(line, target);
    line.push_str("}\n");
}

/// One JSON object per event: `timestamp`, `level`, the event's fields (with `message`),
/// `request_id` inside a request ([`super::with_request_id`]), `target`, and `span` inside a span: the
/// current span's fields and `name`.
///
/// The same lines as tracing-subscriber's `.json().flatten_event(true).with_current_span(true)`,
/// built in one buffer: that formatter re-parses the span's stored JSON for every line and writes
/// token by token through an `io::Write` adaptor, which made it a quarter of a `/session` request.
pub(super) struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let metadata = event.metadata();
        let mut line = String::with_capacity(256);
        line.push_str("{\"timestamp\":\"");
        crate::rfc3339::push(
            &mut line,
            &chrono::Utc::now(),
            chrono::SecondsFormat::Micros,
        );
        write!(line, "\",\"level\":\"{}\"", metadata.level())?;
        let mut fields = JsonObject {
            line,
            scratch: String::new(),
            log_target: None,
        };
        event.record(&mut fields);
        let JsonObject {
            mut line,
            log_target,
            ..
        } = fields;
        let _ = REQUEST_ID.try_with(|id| {
            line.push_str(",\"request_id\":");
            push_json_str(&mut line, id);
        });
        line.push_str(",\"target\":");
        // Events bridged from the `log` crate carry their real target in `log.target`.
        push_json_str(
            &mut line,
            log_target.as_deref().unwrap_or(metadata.target()),
        );
        if let Some(span) = ctx.lookup_current() {
            line.push_str(",\"span\":{\"name\":");
            push_json_str(&mut line, span.name());
            // The span's fields as `JsonMembers` stored them: `,"name":value` each.
            if let Some(fields) = span.extensions().get::<FormattedFields<N>>() {
                line.push_str(fields);
            }
            line.push('}');
        }
        line.push('}');
        writer.write_str(&line)?;
        writeln!(writer)
    }
}

/// A span's fields as JSON object members, `,"name":value` each, stored with the span (when it
/// is made, and as fields are recorded later) for [`JsonLines`] to copy into every line inside it.
/// Written straight into the stored string, like the lines themselves: tracing-subscriber's
/// `JsonFields` goes through a `serde_json` map and serializer for every request's span.
pub(super) struct JsonMembers;

impl<'writer> FormatFields<'writer> for JsonMembers {
    fn format_fields<R: RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> std::fmt::Result {
        let mut members = JsonObject {
            line: String::new(),
            scratch: String::new(),
            log_target: None,
        };
        fields.record(&mut members);
        writer.write_str(&members.line)
    }

    fn add_fields(
        &self,
        current: &'writer mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> std::fmt::Result {
        // Members are appended as they come, each with its own leading comma.
        self.format_fields(current.as_writer(), fields)
    }
}

/// Appends `,"name":value` members to a JSON object being written.
struct JsonObject {
    line: String,
    scratch: String,
    log_target: Option<String>,
}

impl JsonObject {
    /// Starts a member; `false` for fields left out (the `log` bridge's bookkeeping).
    fn key(&mut self, field: &Field) -> bool {
        let name = field.name();
        if name.starts_with("log.") {
            return false;
        }
        let name = name.strip_prefix("r#").unwrap_or(name);
        self.line.push(',');
        push_json_str(&mut self.line, name);
        self.line.push(':');
        true
    }
}

impl Visit for JsonObject {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "log.target" {
            self.log_target = Some(value.to_string());
        }
        if self.key(field) {
            push_json_str(&mut self.line, value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if self.key(field) {
            self.scratch.clear();
            let _ = write!(self.scratch, "{value:?}");
            push_json_str(&mut self.line, &self.scratch);
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if self.key(field) {
            let _ = write!(self.line, "{value}");
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if self.key(field) {
            let _ = write!(self.line, "{value}");
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if self.key(field) {
            let _ = write!(self.line, "{value}");
        }
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        if self.key(field) {
            if value.is_finite() {
                let _ = write!(self.line, "{value}");
            } else {
                // JSON has no NaN or infinity (serde_json writes null too).
                self.line.push_str("null");
            }
        }
    }
}

/// Appends `value` as a JSON string (RFC 8259 §7 escaping).
fn push_json_str(line: &mut String, value: &str) {
    /// The bytes a JSON string cannot hold as they are: controls, `"` and `\`.
    const ESCAPED: [bool; 256] = {
        let mut table = [false; 256];
        let mut byte = 0;
        while byte < 0x20 {
            table[byte] = true;
            byte += 1;
        }
        table[b'"' as usize] = true;
        table[b'\\' as usize] = true;
        table
    };
    line.push('"');
    let mut start = 0;
    for (index, byte) in value.bytes().enumerate() {
        if !ESCAPED[usize::from(byte)] {
            continue;
        }
        line.push_str(&value[start..index]);
        match byte {
            b'"' => line.push_str("\\\""),
            b'\\' => line.push_str("\\\\"),
            b'\n' => line.push_str("\\n"),
            b'\r' => line.push_str("\\r"),
            b'\t' => line.push_str("\\t"),
            _ => {
                let _ = write!(line, "\\u{byte:04x}");
            }
        }
        start = index + 1;
    }
    line.push_str(&value[start..]);
    line.push('"');
}

#[cfg(test)]
mod tests {
    use super::super::{millis, with_request_id};
    use super::*;
    use tracing::Instrument;

    #[test]
    fn strings_are_escaped_as_json() {
        let mut line = String::new();
        push_json_str(&mut line, "a\"b\\c\nd\u{1}é");
        assert_eq!(line, r#""a\"b\\c\nd\u0001é""#);
        let parsed: String = serde_json::from_str(&line).unwrap();
        assert_eq!(parsed, "a\"b\\c\nd\u{1}é");
    }

    use std::sync::{Arc, Mutex};
    use tracing_subscriber::fmt::MakeWriter;

    /// Collects what the subscriber writes.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    impl<'a> MakeWriter<'a> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'a self) -> Buffer {
            self.clone()
        }
    }
    impl Buffer {
        /// A JSON-lines subscriber writing here.
        fn subscriber(&self) -> impl Subscriber + Send + Sync {
            tracing_subscriber::fmt()
                .with_writer(self.clone())
                .fmt_fields(JsonMembers)
                .event_format(JsonLines)
                .finish()
        }

        fn lines(&self) -> Vec<serde_json::Value> {
            let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
            text.lines()
                .map(|line| serde_json::from_str(line).unwrap())
                .collect()
        }
    }

    #[tokio::test]
    async fn every_line_of_a_request_carries_its_id_and_no_other_line_does() {
        let buffer = Buffer::default();
        let _default = tracing::subscriber::set_default(buffer.subscriber());
        with_request_id("r-1".into(), async {
            tracing::info!("first");
            tokio::task::yield_now().await;
            let nested = tracing::info_span!("put_pending", attempt = 1);
            async { tracing::warn!("in a span of its own") }
                .instrument(nested)
                .await;
        })
        .await;
        tracing::info!("between requests");
        with_request_id("r-\"2\"".into(), async { tracing::info!("second") }).await;

        let lines = buffer.lines();
        assert_eq!(lines.len(), 4, "{lines:?}");
        assert_eq!(lines[0]["request_id"], "r-1");
        assert!(lines[0].get("span").is_none(), "no span per request");
        assert_eq!(lines[1]["request_id"], "r-1", "nested spans keep the ID");
        assert_eq!(lines[1]["span"]["name"], "put_pending");
        assert_eq!(lines[1]["span"]["attempt"], 1);
        assert!(lines[2].get("request_id").is_none());
        assert_eq!(lines[3]["request_id"], "r-\"2\"");
    }

    #[tokio::test]
    async fn the_access_line_is_the_line_tracing_writes() {
        const TARGET: &str = "token_broker::routes::middleware";
        let buffer = Buffer::default();
        let _default = tracing::subscriber::set_default(buffer.subscriber());
        let latencies =
            [0, 7, 50, 999, 12_345, 1_000_050, 86_400_000_000_042].map(Duration::from_micros);
        let written = with_request_id("r-\"1\"".into(), async {
            let mut written = Vec::new();
            for latency in latencies {
                tracing::info!(
                    target: TARGET,
                    method = "GET",
                    route = "/auth/{path}",
                    status = 401u16,
                    latency_ms = millis(latency),
                    "request"
                );
                let mut line = String::new();
                let now = chrono::Utc::now();
                access_line(&mut line, &now, TARGET, "GET", "/auth/{path}", 401, latency);
                written.push(line);
            }
            written
        })
        .await;

        let through_tracing = buffer.lines();
        assert_eq!(through_tracing.len(), latencies.len());
        for ((line, latency), mut expected) in
            written.into_iter().zip(latencies).zip(through_tracing)
        {
            assert!(
                line.ends_with("}\n") && line.matches('\n').count() == 1,
                "{line}"
            );
            let mut direct: serde_json::Value = serde_json::from_str(&line).unwrap();
            // The same number, however written: tracing prints a whole 1000.0 as `1000`, the
            // direct line always with three decimals (`1000.000`).
            for value in [&mut direct, &mut expected] {
                let object = value.as_object_mut().unwrap();
                let stamp = object.remove("timestamp").unwrap();
                assert!(stamp.as_str().unwrap().ends_with('Z'));
                let millis = object.remove("latency_ms").unwrap().as_f64().unwrap();
                assert_eq!(millis, latency.as_micros() as f64 / 1000.0, "{line}");
            }
            assert_eq!(direct, expected, "{line}");
        }
    }

    #[test]
    fn lines_are_json_with_the_span_fields() {
        let buffer = Buffer::default();
        tracing::subscriber::with_default(buffer.subscriber(), || {
            let span =
                tracing::info_span!("request", request_id = "r-1", later = tracing::field::Empty);
            span.record("later", "a \"quoted\" value");
            span.in_scope(|| {
                tracing::info!(
                    status = 200u16,
                    latency_ms = 1.5,
                    route = "/x",
                    "request \"done\""
                )
            });
            tracing::info_span!("quiet").in_scope(|| tracing::info!("no fields"));
            tracing::warn!(ok = true, "outside");
        });

        let lines = buffer.lines();
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert_eq!(lines[0]["level"], "INFO");
        assert_eq!(lines[0]["message"], "request \"done\"");
        assert_eq!(lines[0]["status"], 200);
        assert_eq!(lines[0]["latency_ms"], 1.5);
        assert_eq!(lines[0]["route"], "/x");
        assert_eq!(lines[0]["span"]["request_id"], "r-1");
        assert_eq!(lines[0]["span"]["name"], "request");
        assert_eq!(lines[0]["span"]["later"], "a \"quoted\" value");
        assert_eq!(lines[1]["span"], serde_json::json!({"name": "quiet"}));
        assert!(lines[0]["timestamp"].as_str().unwrap().ends_with('Z'));
        assert_eq!(lines[2]["level"], "WARN");
        assert_eq!(lines[2]["ok"], true);
        assert!(lines[2].get("span").is_none());
        assert_eq!(lines[2]["target"], module_path!());
    }
}

//! raft-rs logs through slog; Hanse logs through tracing. This drain
//! carries raft-rs's records into tracing events, with their key-values.

use std::fmt::Write as _;

use slog::{Drain, KV, Level, OwnedKVList, Record, Serializer};

/// A slog logger whose records become tracing events (target `raft`).
pub fn logger() -> slog::Logger {
    slog::Logger::root(TracingDrain.fuse(), slog::o!())
}

struct TracingDrain;

/// Renders key-values as ` key=value` pairs.
struct Pairs(String);

impl Serializer for Pairs {
    fn emit_arguments(&mut self, key: slog::Key, val: &std::fmt::Arguments) -> slog::Result {
        let _ = write!(self.0, " {key}={val}");
        Ok(())
    }
}

impl Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &Record, values: &OwnedKVList) -> Result<(), slog::Never> {
        let mut kv = Pairs(String::new());
        let _ = record.kv().serialize(record, &mut kv);
        let _ = values.serialize(record, &mut kv);
        let message = format!("{}{}", record.msg(), kv.0);
        match record.level() {
            Level::Critical | Level::Error => tracing::error!(target: "raft", "{message}"),
            Level::Warning => tracing::warn!(target: "raft", "{message}"),
            Level::Info => tracing::info!(target: "raft", "{message}"),
            Level::Debug => tracing::debug!(target: "raft", "{message}"),
            Level::Trace => tracing::trace!(target: "raft", "{message}"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing::field::{Field, Visit};
    use tracing::{Event, Subscriber};
    use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<(String, String)>>>);

    struct Message(String);

    impl Visit for Message {
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            if field.name() == "message" {
                self.0 = format!("{value:?}");
            }
        }
    }

    impl<S: Subscriber> Layer<S> for Capture {
        fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
            let mut m = Message(String::new());
            event.record(&mut m);
            self.0.lock().unwrap().push((event.metadata().level().to_string(), m.0));
        }
    }

    #[test]
    fn raft_records_become_tracing_events_with_their_values() {
        let capture = Capture::default();
        let subscriber = tracing_subscriber::registry().with(capture.clone());
        tracing::subscriber::with_default(subscriber, || {
            let log = super::logger().new(slog::o!("raft_id" => 3));
            slog::warn!(log, "became candidate"; "term" => 7);
            slog::debug!(log, "sent heartbeat");
        });
        let events = capture.0.lock().unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].0, "WARN");
        assert!(
            events[0].1.contains("became candidate")
                && events[0].1.contains("term=7")
                && events[0].1.contains("raft_id=3"),
            "{events:?}"
        );
        assert_eq!(events[1].0, "DEBUG");
    }
}

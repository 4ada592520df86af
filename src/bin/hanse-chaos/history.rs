//! The run's history: one JSON object per line, every client operation
//! with its answer, every fault, and every violation the checker saw, in
//! the order they happened. It is what a failed run leaves to replay.

use std::fs::File;
use std::io::{LineWriter, Write};
use std::path::Path;
use std::sync::Mutex;

pub struct History(Mutex<LineWriter<File>>);

impl History {
    pub fn create(path: &Path) -> std::io::Result<History> {
        Ok(History(Mutex::new(LineWriter::new(File::create(path)?))))
    }

    /// Appends `event` as one line.
    pub fn write(&self, event: serde_json::Value) {
        let mut w = self.0.lock().unwrap();
        let _ = writeln!(w, "{event}");
    }

    pub fn flush(&self) {
        let _ = self.0.lock().unwrap().flush();
    }
}

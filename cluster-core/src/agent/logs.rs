//! Task output in rotating files: each file is named by the offset of its
//! first byte (`web.stdout.0`, `web.stdout.1048576`, ...), so a reader
//! asking for byte N finds its file without an index, and offsets stay
//! valid across rotations. The oldest files are deleted past a count.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::rpc::LogChunk;

/// How big each file grows and how many are kept, per task and stream.
#[derive(Clone, Copy, Debug)]
pub struct Rotation {
    pub file_bytes: u64,
    pub files: usize,
}

impl Default for Rotation {
    fn default() -> Self {
        Rotation { file_bytes: 10 << 20, files: 3 }
    }
}

/// The files of one stream: (first offset, path), oldest first.
fn files(dir: &Path, stem: &str) -> Vec<(u64, PathBuf)> {
    let prefix = format!("{stem}.");
    let mut out: Vec<(u64, PathBuf)> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let start = name.strip_prefix(&prefix)?.parse().ok()?;
            Some((start, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// Appends a stream's bytes, rotating as configured. Reopening continues
/// after the last byte written (a restarted task appends).
pub struct RotatingWriter {
    dir: PathBuf,
    stem: String,
    rotation: Rotation,
    file: File,
    start: u64,
    len: u64,
}

impl RotatingWriter {
    pub fn open(dir: &Path, stem: &str, rotation: Rotation) -> std::io::Result<RotatingWriter> {
        // The agent's alone: tasks, which may run as other users, never
        // read one another's output.
        if fs::symlink_metadata(dir).is_ok() {
            owned(dir)?;
        }
        crate::private::private_dir(dir)?;
        owned(dir)?;
        let (start, path) = files(dir, stem).pop().unwrap_or((0, dir.join(format!("{stem}.0"))));
        let file =
            OpenOptions::new().create(true).append(true).mode(0o600).custom_flags(libc::O_NOFOLLOW).open(&path)?;
        let len = file.metadata()?.len();
        Ok(RotatingWriter { dir: dir.into(), stem: stem.into(), rotation, file, start, len })
    }

    pub fn write(&mut self, mut bytes: &[u8]) -> std::io::Result<()> {
        while !bytes.is_empty() {
            if self.len >= self.rotation.file_bytes {
                self.rotate()?;
            }
            let room = (self.rotation.file_bytes - self.len).max(1) as usize;
            let n = room.min(bytes.len());
            self.file.write_all(&bytes[..n])?;
            self.len += n as u64;
            bytes = &bytes[n..];
        }
        Ok(())
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        self.start += self.len;
        self.len = 0;
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(self.dir.join(format!("{}.{}", self.stem, self.start)))?;
        let all = files(&self.dir, &self.stem);
        for (_, old) in all.iter().take(all.len().saturating_sub(self.rotation.files.max(1))) {
            let _ = fs::remove_file(old);
        }
        Ok(())
    }
}

/// Refuses a log directory that is a link or not this process's own: the
/// agent writes and serves its files as itself, so nobody else may have
/// placed them (a task running as another user, security review of item 4).
fn owned(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::symlink_metadata(dir)?;
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.file_type().is_symlink() || meta.uid() != me {
        return Err(std::io::Error::other(format!("{} is not the agent's own directory", dir.display())));
    }
    Ok(())
}

/// Reads up to `max` bytes from `offset`; an offset older than what is
/// kept starts at the oldest byte kept, one past the end starts at the end
/// (so `offset = u64::MAX, max = 0` answers where the end is: `next`).
pub fn read(dir: &Path, stem: &str, offset: u64, max: u64) -> std::io::Result<LogChunk> {
    // A rotation between listing the files and opening one removes the
    // oldest: list again (a few times: rotations are far apart).
    for _ in 0..3 {
        match read_once(dir, stem, offset, max) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            other => return other,
        }
    }
    read_once(dir, stem, offset, max)
}

fn read_once(dir: &Path, stem: &str, offset: u64, max: u64) -> std::io::Result<LogChunk> {
    let all = files(dir, stem);
    let Some(&(oldest, _)) = all.first() else {
        return Ok(LogChunk { next: 0, ..LogChunk::default() });
    };
    let (last_start, last) = all.last().expect("not empty");
    let written = last_start + fs::symlink_metadata(last)?.len();
    let offset = offset.clamp(oldest, written);
    let mut data = Vec::new();
    let mut at = offset;
    for (i, (start, path)) in all.iter().enumerate() {
        let end = all.get(i + 1).map_or(u64::MAX, |(next, _)| *next);
        if at >= end || data.len() as u64 >= max {
            continue;
        }
        let mut f = OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path)?;
        f.seek(SeekFrom::Start(at - start))?;
        let want = max - data.len() as u64;
        let before = data.len();
        f.take(want).read_to_end(&mut data)?;
        at += (data.len() - before) as u64;
    }
    Ok(LogChunk { data, next: at, oldest, done: false })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_survive_rotation_and_old_files_go() {
        let dir = std::env::temp_dir().join(format!("hanse-logs-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let mut w = RotatingWriter::open(&dir, "t.stdout", Rotation { file_bytes: 10, files: 2 }).unwrap();
        w.write(b"0123456789abcdefghij").unwrap();
        w.write(b"KLMNO").unwrap();
        // 25 bytes in files of 10, two kept: bytes 10.. remain.
        let c = read(&dir, "t.stdout", 0, 100).unwrap();
        assert_eq!(c.oldest, 10);
        assert_eq!(c.data, b"abcdefghijKLMNO");
        assert_eq!(c.next, 25);
        let c = read(&dir, "t.stdout", 18, 4).unwrap();
        assert_eq!((c.data.as_slice(), c.next), (&b"ijKL"[..], 22));
        // Past the end reads nothing and says where the end is.
        let c = read(&dir, "t.stdout", u64::MAX, 0).unwrap();
        assert_eq!((c.data.len(), c.next, c.oldest), (0, 25, 10));
        drop(w);
        let mut w = RotatingWriter::open(&dir, "t.stdout", Rotation { file_bytes: 10, files: 2 }).unwrap();
        w.write(b"P").unwrap();
        assert_eq!(read(&dir, "t.stdout", 25, 10).unwrap().data, b"P");
        fs::remove_dir_all(&dir).unwrap();
    }
}

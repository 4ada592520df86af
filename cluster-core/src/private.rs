//! Where secrets rest: the Raft log (job specs with their `env`), an
//! agent's state and its tasks' logs. Directories are 0700 and files 0600
//! whatever the umask, so no other local account reads them (security
//! review, row 14).

use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Creates `dir` (and its parents) if needed, and makes it 0700.
pub fn private_dir(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Makes the existing file `path` 0600.
pub fn private_file(path: &Path) -> io::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}

/// Writes `bytes` to `path`, created 0600 (or made 0600 if it existed),
/// and syncs it to disk.
pub fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    private_file(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

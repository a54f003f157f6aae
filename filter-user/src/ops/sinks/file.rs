//! JSON lines appended to a file that survives rotation: the file is reopened on `reopen()`
//! (SIGHUP) and when the path names another inode (checked at most once a second), so
//! logrotate's `create` rotation loses no line: lines written before the check land in the
//! renamed file, the rest in the new one. (`copytruncate` can lose lines by design; use
//! `create`, and `delaycompress` or a postrotate SIGHUP with `compress`.)

use std::{
    fs::{File, OpenOptions},
    io::{self, Write},
    os::unix::fs::{MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use super::{Line, Output};

const CHECK_EVERY: Duration = Duration::from_secs(1);

pub(super) struct FileOutput {
    path: PathBuf,
    file: Option<File>,
    /// (device, inode) of the open file.
    id: (u64, u64),
    checked: Instant,
    /// A line was cut off by a failed write: the next write starts a new line first.
    torn: bool,
    buf: Vec<u8>,
}

impl FileOutput {
    pub(super) fn open(path: &Path) -> io::Result<FileOutput> {
        let mut out = FileOutput {
            path: path.to_path_buf(),
            file: None,
            id: (0, 0),
            checked: Instant::now(),
            torn: false,
            buf: Vec::new(),
        };
        out.reopen()
            .map_err(|e| io::Error::new(e.kind(), format!("audit file {}: {e}", path.display())))?;
        Ok(out)
    }

    fn reopen(&mut self) -> io::Result<()> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        // Audit lines name users and sources: not for everyone's eyes.
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(&self.path)?;
        let m = file.metadata()?;
        self.id = (m.dev(), m.ino());
        self.file = Some(file);
        self.checked = Instant::now();
        Ok(())
    }

    /// Whether the path still names the open file.
    fn rotated(&self) -> bool {
        match std::fs::metadata(&self.path) {
            Ok(m) => (m.dev(), m.ino()) != self.id,
            Err(_) => true,
        }
    }
}

impl Output for FileOutput {
    fn tick(&mut self, reopen: bool) -> io::Result<()> {
        if reopen || self.file.is_none() {
            return self.reopen();
        }
        if self.checked.elapsed() >= CHECK_EVERY {
            self.checked = Instant::now();
            if self.rotated() {
                tracing::info!(path = %self.path.display(), "audit file rotated: reopening");
                return self.reopen();
            }
        }
        Ok(())
    }

    fn write(&mut self, lines: &[Line]) -> io::Result<usize> {
        let Some(file) = self.file.as_mut() else {
            return Err(io::Error::other("not open"));
        };
        self.buf.clear();
        if self.torn {
            self.buf.push(b'\n');
        }
        let start = self.buf.len();
        // Where each line ends in the buffer.
        let mut ends = Vec::with_capacity(lines.len());
        for l in lines {
            self.buf.extend_from_slice(l);
            self.buf.push(b'\n');
            ends.push(self.buf.len());
        }
        let mut written = 0;
        while written < self.buf.len() {
            match file.write(&self.buf[written..]) {
                Ok(0) => break,
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let whole = ends.iter().take_while(|&&end| end <= written).count();
                    // A leading newline not yet written leaves the old tear in place.
                    if written >= start {
                        self.torn = written > start && !ends.contains(&written);
                    }
                    return if whole > 0 { Ok(whole) } else { Err(e) };
                }
            }
        }
        self.torn = false;
        Ok(ends.iter().take_while(|&&end| end <= written).count())
    }
}

/// JSON lines on standard output (no `[audit]` and no `proxy.audit_log`).
pub(super) struct StdoutOutput;

impl Output for StdoutOutput {
    fn write(&mut self, lines: &[Line]) -> io::Result<usize> {
        let mut out = io::stdout().lock();
        for (i, l) in lines.iter().enumerate() {
            if let Err(e) = out.write_all(l).and_then(|()| out.write_all(b"\n")) {
                return if i > 0 { Ok(i) } else { Err(e) };
            }
        }
        out.flush()?;
        Ok(lines.len())
    }
}

//! A config file and every file it names, as bytes. The agent reads files as root and hands
//! the bundle to the proxy, which parses exactly what the agent parsed without any access to
//! the filesystem; a fleet stores a bundle as one config revision.

use std::{
    collections::BTreeMap,
    fs, io,
    path::{Path, PathBuf},
    sync::Mutex,
};

use serde::{Deserialize, Serialize};

/// Where the files a config names come from.
pub trait Files {
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;
}

/// The disk, remembering every file read so that the reads can become a [`Bundle`].
#[derive(Default)]
pub struct Disk {
    read: Mutex<BTreeMap<PathBuf, Vec<u8>>>,
}

impl Files for Disk {
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let bytes = fs::read(path)?;
        if let Ok(mut read) = self.read.lock() {
            read.insert(path.to_path_buf(), bytes.clone());
        }
        Ok(bytes)
    }
}

impl Disk {
    pub fn into_bundle(self, path: &Path, text: String) -> Bundle {
        Bundle {
            path: path.to_path_buf(),
            text,
            files: self.read.into_inner().unwrap_or_default(),
        }
    }
}

/// A config and its files, read once.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bundle {
    /// Where the config was read from: relative paths in it are relative to this file.
    pub path: PathBuf,
    pub text: String,
    /// Every file the config names, by the path it resolved to.
    pub files: BTreeMap<PathBuf, Vec<u8>>,
}

impl Files for Bundle {
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        self.files.get(path).cloned().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} is not part of the config bundle", path.display()),
            )
        })
    }
}

impl Bundle {
    /// The bytes of a file the config names, for the layers that load keys and
    /// certificates from it.
    pub fn file(&self, path: &Path) -> io::Result<&[u8]> {
        self.files.get(path).map(Vec::as_slice).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} is not part of the config bundle", path.display()),
            )
        })
    }
}

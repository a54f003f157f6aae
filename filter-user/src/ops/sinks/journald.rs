//! The journal's native protocol: one datagram per line on journald's socket, with MESSAGE,
//! PRIORITY, SYSLOG_IDENTIFIER=ewsgate and each audit field as EWSGATE_<NAME>. A line too
//! large for a datagram goes as a sealed memfd passed with SCM_RIGHTS, as sd_journal_send
//! does.

use std::{
    fs::File,
    io::{self, Write},
    os::{
        fd::{AsRawFd, FromRawFd},
        unix::net::UnixDatagram,
    },
    path::{Path, PathBuf},
};

use serde_json::Value;

use super::{severity, summary, Line, Output};

pub(super) struct JournalOutput {
    socket: PathBuf,
    sock: Option<UnixDatagram>,
    buf: Vec<u8>,
}

impl JournalOutput {
    pub(super) fn new(socket: &Path) -> JournalOutput {
        JournalOutput {
            socket: socket.to_path_buf(),
            sock: None,
            buf: Vec::new(),
        }
    }

    fn send(&mut self) -> io::Result<()> {
        let sock = match &self.sock {
            Some(s) => s,
            None => self.sock.insert(UnixDatagram::unbound()?),
        };
        match sock.send_to(&self.buf, &self.socket) {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => {
                send_memfd(sock, &self.socket, &self.buf)
            }
            Err(e) => Err(e),
        }
    }
}

impl Output for JournalOutput {
    fn write(&mut self, lines: &[Line]) -> io::Result<usize> {
        for (i, line) in lines.iter().enumerate() {
            self.buf.clear();
            encode(line, &mut self.buf);
            if let Err(e) = self.send() {
                return if i > 0 { Ok(i) } else { Err(e) };
            }
        }
        Ok(lines.len())
    }
}

/// The journal entry for one audit line. A line that is not a JSON object still goes, whole,
/// as MESSAGE.
pub(super) fn encode(line: &[u8], out: &mut Vec<u8>) {
    let value: Option<Value> = serde_json::from_slice(line).ok();
    let object = value.as_ref().and_then(Value::as_object);
    let (message, priority) = match &value {
        Some(v) if object.is_some() => (summary(v), severity(v)),
        _ => (String::from_utf8_lossy(line).into_owned(), 5),
    };
    field(out, "MESSAGE", message.as_bytes());
    field(out, "PRIORITY", priority.to_string().as_bytes());
    field(out, "SYSLOG_IDENTIFIER", b"ewsgate");
    for (k, v) in object.into_iter().flatten() {
        let text = match v {
            Value::Null => continue,
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        field(out, &field_name(k), text.as_bytes());
    }
}

/// EWSGATE_ and the key upper-cased, anything but letters, digits and `_` as `_`, at most
/// 64 characters (journald's limit).
fn field_name(key: &str) -> String {
    let mut name = String::from("EWSGATE_");
    for c in key.chars() {
        name.push(if c.is_ascii_alphanumeric() {
            c.to_ascii_uppercase()
        } else {
            '_'
        });
    }
    name.truncate(64);
    name
}

/// `NAME=value\n`, or for a value with a newline `NAME\n`, its length as 64-bit little
/// endian, the value and `\n`.
fn field(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    if value.contains(&b'\n') {
        out.push(b'\n');
        out.extend_from_slice(&(value.len() as u64).to_le_bytes());
    } else {
        out.push(b'=');
    }
    out.extend_from_slice(value);
    out.push(b'\n');
}

/// Sends `data` as a sealed memfd: journald reads entries larger than a datagram this way.
fn send_memfd(sock: &UnixDatagram, path: &Path, data: &[u8]) -> io::Result<()> {
    // SAFETY: a NUL-terminated name and valid flags; the result is checked.
    let fd = unsafe {
        libc::memfd_create(
            c"ewsgate-journal".as_ptr(),
            libc::MFD_ALLOW_SEALING | libc::MFD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor we own; File closes it.
    let mut file = unsafe { File::from_raw_fd(fd) };
    file.write_all(data)?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on our own descriptor.
    if unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, seals) } < 0 {
        return Err(io::Error::last_os_error());
    }
    send_fd(sock, path, file.as_raw_fd())
}

fn send_fd(sock: &UnixDatagram, path: &Path, fd: i32) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: zeroed sockaddr_un is valid; the path is copied with its length checked.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::other("journal socket path too long"));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let space = unsafe { libc::CMSG_SPACE(size_of::<i32>() as u32) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: msghdr points at live buffers for the duration of sendmsg; the control
    // message is laid out with the CMSG_* macros within `control`.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_name = (&mut addr as *mut libc::sockaddr_un).cast();
        msg.msg_namelen = size_of::<libc::sockaddr_un>() as u32;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null() {
            return Err(io::Error::other("no room for the control message"));
        }
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<i32>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<i32>(), fd);
        if libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// Parses a native-protocol datagram back into (name, value) pairs.
    pub(crate) fn decode(mut d: &[u8]) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        while !d.is_empty() {
            let nl = d.iter().position(|&b| b == b'\n').unwrap();
            let head = &d[..nl];
            if let Some(eq) = head.iter().position(|&b| b == b'=') {
                out.push((
                    String::from_utf8(head[..eq].to_vec()).unwrap(),
                    head[eq + 1..].to_vec(),
                ));
                d = &d[nl + 1..];
            } else {
                let len = u64::from_le_bytes(d[nl + 1..nl + 9].try_into().unwrap()) as usize;
                out.push((
                    String::from_utf8(head.to_vec()).unwrap(),
                    d[nl + 9..nl + 9 + len].to_vec(),
                ));
                assert_eq!(d[nl + 9 + len], b'\n');
                d = &d[nl + 10 + len..];
            }
        }
        out
    }

    #[test]
    fn fields_and_binary_values() {
        let mut out = Vec::new();
        encode(
            br#"{"kind":"request","decision":"deny","user":"a\nb","source":"203.0.113.9","items":3,"token_item":null,"source-group":"x"}"#,
            &mut out,
        );
        let f = decode(&out);
        let get = |k: &str| f.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        assert_eq!(get("PRIORITY").unwrap(), b"5");
        assert_eq!(get("SYSLOG_IDENTIFIER").unwrap(), b"ewsgate");
        assert_eq!(get("EWSGATE_USER").unwrap(), b"a\nb");
        assert_eq!(get("EWSGATE_ITEMS").unwrap(), b"3");
        assert_eq!(get("EWSGATE_SOURCE_GROUP").unwrap(), b"x");
        assert!(get("EWSGATE_TOKEN_ITEM").is_none());
        assert!(String::from_utf8(get("MESSAGE").unwrap())
            .unwrap()
            .starts_with("deny a\nb from 203.0.113.9"));
    }
}

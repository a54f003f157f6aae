//! Syslog to a SIEM: RFC 5424 messages over UDP (RFC 5426, one datagram each) or TCP with
//! octet-counting framing (RFC 6587: `LEN SP MSG`). The message is the audit line's JSON.
//!
//! TCP: a broken connection is reopened and the unsent lines go again; lines the kernel had
//! accepted before the break may be lost, as with any plain-TCP syslog (RFC 6587 has no
//! acknowledgements). UDP is lossy by nature.

use std::{
    io::{self, Write},
    net::{SocketAddr, TcpStream, ToSocketAddrs, UdpSocket},
    time::{Duration, Instant},
};

use super::{severity, Line, Output};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest UDP payload over IPv4.
const MAX_DATAGRAM: usize = 65_507;

/// The RFC 5424 header fields that do not change per line.
pub(super) struct Format {
    facility: u8,
    hostname: String,
    procid: String,
}

impl Format {
    pub(super) fn new(facility: u8, hostname: Option<String>) -> Format {
        Format {
            facility,
            hostname: hostname.unwrap_or_else(system_hostname),
            procid: std::process::id().to_string(),
        }
    }

    /// `<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - MSG`.
    pub(super) fn message(&self, line: &[u8], out: &mut Vec<u8>) {
        let v: Option<serde_json::Value> = serde_json::from_slice(line).ok();
        let sev = v.as_ref().map_or(5, severity);
        let time = v
            .as_ref()
            .and_then(|v| v.get("time")?.as_str().map(str::to_string))
            .filter(|t| valid_timestamp(t))
            .unwrap_or_else(|| "-".into());
        let msgid = v
            .as_ref()
            .and_then(|v| v.get("kind")?.as_str().map(str::to_string))
            .filter(|k| printable(k, 32))
            .unwrap_or_else(|| "-".into());
        let pri = u16::from(self.facility) * 8 + u16::from(sev);
        out.extend_from_slice(
            format!(
                "<{pri}>1 {time} {} ewsgate {} {msgid} - ",
                self.hostname, self.procid
            )
            .as_bytes(),
        );
        out.extend_from_slice(line);
    }
}

/// PRINTUSASCII (33..=126), 1 to `max` characters: what RFC 5424 allows in a header field.
fn printable(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && s.bytes().all(|b| (33..=126).contains(&b))
}

/// The audit's `2026-11-23T12:00:00.123Z`, checked so a header is never malformed.
fn valid_timestamp(t: &str) -> bool {
    printable(t, 32)
        && time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).is_ok()
}

fn system_hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer and its length are valid; gethostname NUL-terminates within it
    // when the name fits.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let name = if ok {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        String::new()
    };
    if printable(&name, 255) {
        name
    } else {
        "-".into()
    }
}

fn resolve(address: &str) -> io::Result<SocketAddr> {
    address
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::other(format!("{address}: no address")))
}

pub(super) struct UdpOutput {
    address: String,
    format: Format,
    sock: Option<UdpSocket>,
    buf: Vec<u8>,
    /// Port-unreachable answers: datagrams the network lost.
    unreachable: u64,
}

impl UdpOutput {
    pub(super) fn new(address: &str, format: Format) -> UdpOutput {
        UdpOutput {
            address: address.to_string(),
            format,
            sock: None,
            buf: Vec::new(),
            unreachable: 0,
        }
    }

    fn socket(&mut self) -> io::Result<&UdpSocket> {
        if self.sock.is_none() {
            let peer = resolve(&self.address)?;
            let local: SocketAddr = if peer.is_ipv4() {
                ([0, 0, 0, 0], 0).into()
            } else {
                (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
            };
            let s = UdpSocket::bind(local)?;
            s.connect(peer)?;
            self.sock = Some(s);
        }
        self.sock
            .as_ref()
            .ok_or_else(|| io::Error::other("no socket"))
    }
}

impl Output for UdpOutput {
    fn write(&mut self, lines: &[Line]) -> io::Result<usize> {
        for (i, line) in lines.iter().enumerate() {
            let mut buf = std::mem::take(&mut self.buf);
            buf.clear();
            self.format.message(line, &mut buf);
            if buf.len() > MAX_DATAGRAM {
                // Cannot ever go as one datagram: say so loudly and cut it at a safe size
                // (the SIEM gets a truncated line rather than none).
                tracing::error!(
                    bytes = buf.len(),
                    "audit line too long for a syslog datagram: truncated"
                );
                buf.truncate(MAX_DATAGRAM);
            }
            let sent = self.socket().and_then(|s| s.send(&buf));
            self.buf = buf;
            // A port unreachable (ICMP) for an earlier datagram: that one is lost, as UDP
            // may lose any; this one goes on a fresh socket rather than filling the queue
            // while the SIEM is down.
            if let Err(e) = &sent {
                if e.kind() == io::ErrorKind::ConnectionRefused {
                    self.unreachable += 1;
                    if self.unreachable.is_power_of_two() {
                        tracing::warn!(address = %self.address, times = self.unreachable, "syslog receiver unreachable: datagrams lost");
                    }
                    self.sock = None;
                    let buf = std::mem::take(&mut self.buf);
                    let resent = self.socket().and_then(|s| s.send(&buf));
                    self.buf = buf;
                    if resent.is_ok() {
                        continue;
                    }
                }
            }
            if let Err(e) = sent {
                // Resolve and connect afresh next time (the SIEM may have moved).
                self.sock = None;
                return if i > 0 { Ok(i) } else { Err(e) };
            }
        }
        Ok(lines.len())
    }
}

pub(super) struct TcpOutput {
    address: String,
    format: Format,
    conn: Option<TcpStream>,
    buf: Vec<u8>,
    last_attempt: Option<Instant>,
}

impl TcpOutput {
    pub(super) fn new(address: &str, format: Format) -> TcpOutput {
        TcpOutput {
            address: address.to_string(),
            format,
            conn: None,
            buf: Vec::new(),
            last_attempt: None,
        }
    }

    fn connect(&mut self) -> io::Result<&mut TcpStream> {
        if self.conn.is_none() {
            self.last_attempt = Some(Instant::now());
            let peer = resolve(&self.address)?;
            let s = TcpStream::connect_timeout(&peer, CONNECT_TIMEOUT)?;
            s.set_write_timeout(Some(WRITE_TIMEOUT))?;
            s.set_nodelay(true)?;
            tracing::info!(peer = %peer, "syslog sink connected");
            self.conn = Some(s);
        }
        self.conn
            .as_mut()
            .ok_or_else(|| io::Error::other("not connected"))
    }
}

impl Output for TcpOutput {
    fn write(&mut self, lines: &[Line]) -> io::Result<usize> {
        // Frame the whole batch into one buffer, remembering where each frame ends.
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        let mut ends = Vec::with_capacity(lines.len());
        let mut msg = Vec::new();
        for line in lines {
            msg.clear();
            self.format.message(line, &mut msg);
            buf.extend_from_slice(format!("{} ", msg.len()).as_bytes());
            buf.extend_from_slice(&msg);
            ends.push(buf.len());
        }
        let result = match self.connect() {
            Ok(conn) => write_counting(conn, &buf),
            Err(e) => Err((0, e)),
        };
        let outcome = match result {
            Ok(()) => Ok(lines.len()),
            Err((written, e)) => {
                // The connection is unusable after a partial frame: drop it; whole frames
                // count as sent, the rest goes again on a new connection.
                self.conn = None;
                let whole = ends.iter().take_while(|&&end| end <= written).count();
                if whole > 0 {
                    Ok(whole)
                } else {
                    Err(e)
                }
            }
        };
        self.buf = buf;
        outcome
    }
}

/// Writes all of `buf`, or says how many bytes went before the error.
fn write_counting(w: &mut impl Write, buf: &[u8]) -> Result<(), (usize, io::Error)> {
    let mut written = 0;
    while written < buf.len() {
        match w.write(&buf[written..]) {
            Ok(0) => return Err((written, io::ErrorKind::WriteZero.into())),
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err((written, e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_fields_are_checked() {
        let f = Format::new(16, Some("gate-1".into()));
        let mut out = Vec::new();
        f.message(
            br#"{"time":"2026-11-23T12:00:00.123Z","kind":"request","decision":"allow"}"#,
            &mut out,
        );
        let text = String::from_utf8(out).unwrap();
        let pid = std::process::id();
        assert_eq!(
            text,
            format!("<134>1 2026-11-23T12:00:00.123Z gate-1 ewsgate {pid} request - {{\"time\":\"2026-11-23T12:00:00.123Z\",\"kind\":\"request\",\"decision\":\"allow\"}}")
        );
        let mut out = Vec::new();
        f.message(br#"{"time":"yesterday","kind":"a b"}"#, &mut out);
        assert!(String::from_utf8(out)
            .unwrap()
            .starts_with(&format!("<133>1 - gate-1 ewsgate {pid} - - ")));
    }
}

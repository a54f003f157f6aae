//! `ewsgate watch`: a live, rate-limited sample of the XDP program's drops. The agent turns
//! the program's drop events on only while a watcher is connected (`Settings::watch_rate`,
//! limited per CPU and second in the program), reads them from the pinned `DROPS` ring
//! buffer and streams them on the watcher's control connection, one JSON line each.

use std::{
    io::{BufRead, BufReader, Write},
    mem::size_of,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::{fd::AsRawFd, unix::net::UnixStream as StdStream},
    path::{Path, PathBuf},
    sync::mpsc,
    time::Duration,
};

use aya::maps::{Map, MapData, RingBuf};
use serde::{Deserialize, Serialize};
use tokio::{io::AsyncWriteExt, net::UnixStream};

use filter_common::{DropEvent, Reason};

use crate::agent::{
    control::{ControlError, Request, Response},
    worker::Command,
};

/// Events per second and CPU a watcher may ask for.
pub const MAX_RATE: u32 = 1000;
/// How often the agent looks for events and for a watcher that left.
const POLL: Duration = Duration::from_millis(20);

/// One drop as the watcher sees it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Drop {
    pub source: Option<IpAddr>,
    pub destination: Option<IpAddr>,
    /// `tcp`, `udp`, `icmp`, `icmpv6`, or the protocol number.
    pub proto: String,
    pub port: Option<u16>,
    pub reason: String,
}

impl Drop {
    fn from_event(e: &DropEvent) -> Drop {
        let addr = |w: &[u32; 4]| -> Option<IpAddr> {
            match e.family {
                4 => Some(Ipv4Addr::from(w[3].to_ne_bytes()).into()),
                6 => {
                    let mut b = [0u8; 16];
                    for (i, word) in w.iter().enumerate() {
                        b[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
                    }
                    let v6 = Ipv6Addr::from(b);
                    // The dynamic maps' key form: IPv4 sources are IPv4-mapped.
                    Some(v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4))
                }
                _ => None,
            }
        };
        let proto = match e.proto {
            6 => "tcp".to_string(),
            17 => "udp".to_string(),
            1 => "icmp".to_string(),
            58 => "icmpv6".to_string(),
            n => n.to_string(),
        };
        Drop {
            source: addr(&e.source),
            destination: addr(&e.destination),
            proto,
            port: (e.port != 0).then_some(e.port),
            reason: Reason::ALL
                .get(e.reason as usize)
                .map_or("unknown", |r| r.name())
                .to_string(),
        }
    }

    /// One line of `ewsgate watch`.
    pub fn line(&self) -> String {
        let addr = |a: &Option<IpAddr>| a.map_or("?".to_string(), |a| a.to_string());
        let port = self.port.map_or(String::new(), |p| format!("/{p}"));
        format!(
            "{} -> {} {}{} {}",
            addr(&self.source),
            addr(&self.destination),
            self.proto,
            port,
            self.reason
        )
    }
}

/// Serves one watcher on its control connection until it leaves or has `count` drops.
pub async fn serve(
    mut stream: UnixStream,
    rate: u32,
    count: Option<u64>,
    tx: mpsc::Sender<Command>,
) {
    let pin = match ask(&tx, Request::Watch { rate, count }).await {
        Response::Ok { message } => PathBuf::from(message),
        other => {
            let _ = stream.write_all(answer(&other).as_bytes()).await;
            return;
        }
    };
    let end = match stream.into_std() {
        Ok(std) => tokio::task::spawn_blocking(move || stream_drops(std, &pin, count))
            .await
            .unwrap_or_else(|e| Err(e.to_string())),
        Err(e) => Err(e.to_string()),
    };
    let _ = ask(&tx, Request::Unwatch).await;
    if let Err(e) = end {
        tracing::warn!(error = %e, "ewsgate watch ended");
    }
}

async fn ask(tx: &mpsc::Sender<Command>, req: Request) -> Response {
    let (reply, answer) = tokio::sync::oneshot::channel();
    if tx.send(Command::Request(req, reply)).is_err() {
        return Response::Error {
            message: "the agent is shutting down".into(),
        };
    }
    answer.await.unwrap_or(Response::Error {
        message: "no answer from the worker".into(),
    })
}

fn answer(r: &Response) -> String {
    let mut out = serde_json::to_string(r).unwrap_or_default();
    out.push('\n');
    out
}

/// The blocking part: read the ring buffer, write lines, notice the watcher leaving.
fn stream_drops(mut out: StdStream, pin: &Path, count: Option<u64>) -> Result<(), String> {
    out.set_nonblocking(false).map_err(|e| e.to_string())?;
    out.set_write_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let data = MapData::from_pin(pin).map_err(|e| format!("{}: {e}", pin.display()))?;
    let mut ring = RingBuf::try_from(Map::RingBuf(data)).map_err(|e| e.to_string())?;
    // What an earlier watcher left unread is old news.
    while ring.next().is_some() {}
    let mut sent = 0u64;
    loop {
        while let Some(item) = ring.next() {
            if item.len() < size_of::<DropEvent>() {
                continue;
            }
            // SAFETY: the program writes whole DropEvents, plain data of this size.
            let event = unsafe { item.as_ptr().cast::<DropEvent>().read_unaligned() };
            let mut line =
                serde_json::to_string(&Drop::from_event(&event)).map_err(|e| e.to_string())?;
            line.push('\n');
            out.write_all(line.as_bytes()).map_err(|e| e.to_string())?;
            sent += 1;
            if count.is_some_and(|c| sent >= c) {
                let done = Response::Ok {
                    message: format!("{sent} drops"),
                };
                let _ = out.write_all(answer(&done).as_bytes());
                return Ok(());
            }
        }
        if gone(&out) {
            return Ok(());
        }
        std::thread::sleep(POLL);
    }
}

/// Whether the watcher closed its end (a peek that reads end-of-file).
fn gone(s: &StdStream) -> bool {
    let mut b = [0u8; 1];
    // SAFETY: a one-byte peek into a local buffer on our own socket.
    let n = unsafe {
        libc::recv(
            s.as_raw_fd(),
            b.as_mut_ptr().cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n == 0
}

/// The CLI side: asks the agent at `socket` for drops and prints each as it comes.
pub fn client(socket: &Path, rate: u32, count: Option<u64>, json: bool) -> anyhow::Result<()> {
    let mut stream = StdStream::connect(socket).map_err(|source| ControlError::Connect {
        path: socket.display().to_string(),
        source,
    })?;
    let mut line = serde_json::to_string(&Request::Watch { rate, count })?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut out = std::io::stdout().lock();
    for line in BufReader::new(stream).lines() {
        let line = line?;
        if let Ok(drop) = serde_json::from_str::<Drop>(&line) {
            if json {
                writeln!(out, "{line}")?;
            } else {
                writeln!(out, "{}", drop.line())?;
            }
            out.flush()?;
            continue;
        }
        match serde_json::from_str::<Response>(&line)? {
            Response::Error { message } => anyhow::bail!("{message}"),
            _ => return Ok(()),
        }
    }
    Ok(())
}

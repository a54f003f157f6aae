//! A feed publisher for the tests: HTTPS with a certificate the test minted, serving whatever
//! the test sets (a document with its ETag, an error status, a redirect, or a stall), and
//! recording each request's conditional headers.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::Context;
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};

use crate::lab::Netns;

/// What the next requests get.
#[derive(Debug, Clone)]
pub enum Serve {
    /// 200 with this body and ETag; 304 when `If-None-Match` names the ETag.
    Doc {
        body: String,
        etag: String,
    },
    /// The handshake completes and then nothing comes, for up to 30 s.
    Stall,
    Status(u16),
    Redirect(String),
}

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    pub if_none_match: Option<String>,
    pub answered: u16,
}

pub struct FeedServer {
    pub addr: SocketAddr,
    pub serve: Arc<Mutex<Serve>>,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    accept: Option<thread::JoinHandle<()>>,
}

impl FeedServer {
    /// Listens on `addr` inside `ns` with `<dir>/<cert>.pem` and `.key`.
    pub fn start(
        ns: &Netns,
        addr: SocketAddr,
        dir: &Path,
        cert: &str,
    ) -> anyhow::Result<FeedServer> {
        let chain = CertificateDer::pem_file_iter(dir.join(format!("{cert}.pem")))?
            .collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_file(dir.join(format!("{cert}.key")))?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = Arc::new(
            rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()?
                .with_no_client_auth()
                .with_single_cert(chain, key)?,
        );
        let listener = ns
            .run(move || TcpListener::bind(addr))
            .context("feed server bind")?;
        listener.set_nonblocking(true)?;
        let serve = Arc::new(Mutex::new(Serve::Status(404)));
        let seen: Arc<Mutex<Vec<Seen>>> = Default::default();
        let stop = Arc::new(AtomicBool::new(false));
        let accept = {
            let (serve, seen, stop) = (serve.clone(), seen.clone(), stop.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((tcp, _)) => {
                            let (config, serve, seen, stop) =
                                (config.clone(), serve.clone(), seen.clone(), stop.clone());
                            thread::spawn(move || {
                                let _ = answer(tcp, config, &serve, &seen, &stop);
                            });
                        }
                        Err(_) => thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        };
        Ok(FeedServer {
            addr,
            serve,
            seen,
            stop,
            accept: Some(accept),
        })
    }

    pub fn set(&self, s: Serve) {
        if let Ok(mut serve) = self.serve.lock() {
            *serve = s;
        }
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl Drop for FeedServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

fn answer(
    tcp: TcpStream,
    config: Arc<rustls::ServerConfig>,
    serve: &Mutex<Serve>,
    seen: &Mutex<Vec<Seen>>,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    tcp.set_nonblocking(false)?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    let conn = rustls::ServerConnection::new(config)?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if tls.read(&mut byte)? == 0 || head.len() > 16 * 1024 {
            return Ok(());
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let path = text.split(' ').nth(1).unwrap_or("").to_string();
    let if_none_match = text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("if-none-match")
            .then(|| v.trim().to_string())
    });
    let what = serve
        .lock()
        .map(|s| s.clone())
        .unwrap_or(Serve::Status(500));
    let (status, headers, body) = match what {
        Serve::Stall => {
            record(seen, &path, &if_none_match, 0);
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline && !stop.load(Ordering::SeqCst) {
                thread::sleep(Duration::from_millis(50));
            }
            return Ok(());
        }
        Serve::Doc { etag, .. } if if_none_match.as_deref() == Some(etag.as_str()) => {
            (304, format!("ETag: {etag}\r\n"), String::new())
        }
        Serve::Doc { body, etag } => (
            200,
            format!("ETag: {etag}\r\nContent-Type: application/json\r\n"),
            body,
        ),
        Serve::Status(s) => (s, String::new(), "error\n".to_string()),
        Serve::Redirect(to) => (302, format!("Location: {to}\r\n"), String::new()),
    };
    record(seen, &path, &if_none_match, status);
    let reply = format!(
        "HTTP/1.1 {status} X\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(reply.as_bytes())?;
    tls.flush()?;
    tls.conn.send_close_notify();
    let _ = tls.flush();
    Ok(())
}

fn record(seen: &Mutex<Vec<Seen>>, path: &str, inm: &Option<String>, answered: u16) {
    if let Ok(mut s) = seen.lock() {
        s.push(Seen {
            path: path.into(),
            if_none_match: inm.clone(),
            answered,
        });
    }
}

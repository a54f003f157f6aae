//! A stand-in for the servers ewsgate fetches signing keys from (Exchange auth metadata,
//! Entra ID discovery and JWKS): HTTP or HTTPS on a namespace's loopback, each path
//! answering what the test set (status, body, `Location`, a delay), every request counted.

use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::Context;
use rustls::{
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    ServerConfig, ServerConnection, StreamOwned,
};

use crate::lab::Netns;

#[derive(Debug, Clone, Default)]
pub struct Answer {
    pub status: u16,
    pub body: String,
    pub location: Option<String>,
    /// Waited before the head is sent.
    pub delay: Duration,
}

impl Answer {
    pub fn ok(body: impl Into<String>) -> Answer {
        Answer {
            status: 200,
            body: body.into(),
            ..Default::default()
        }
    }

    pub fn status(status: u16) -> Answer {
        Answer {
            status,
            ..Default::default()
        }
    }
}

type Answers = Arc<Mutex<HashMap<String, Answer>>>;

pub struct DocServer {
    answers: Answers,
    hits: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

impl Drop for DocServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl DocServer {
    /// Serves on `addr` inside `ns`; with `tls` (PEM chain, PEM key) it speaks HTTPS.
    pub fn start(ns: &Netns, addr: &str, tls: Option<(&str, &str)>) -> anyhow::Result<DocServer> {
        let a = addr.to_string();
        let listener = ns
            .run(move || TcpListener::bind(a))
            .with_context(|| format!("binding {addr}"))?;
        listener.set_nonblocking(true)?;
        let tls = tls.map(server_config).transpose()?.map(Arc::new);
        let server = DocServer {
            answers: Default::default(),
            hits: Default::default(),
            stop: Default::default(),
        };
        let (answers, hits, stop) = (
            server.answers.clone(),
            server.hits.clone(),
            server.stop.clone(),
        );
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((tcp, _)) => {
                        let (answers, hits, tls) = (answers.clone(), hits.clone(), tls.clone());
                        thread::spawn(move || {
                            let _ = serve(tcp, tls, &answers, &hits);
                        });
                    }
                    Err(_) => thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Ok(server)
    }

    pub fn answer(&self, path: &str, answer: Answer) {
        self.answers
            .lock()
            .expect("answers")
            .insert(path.to_string(), answer);
    }

    /// Requests for `path` so far.
    pub fn hits(&self, path: &str) -> usize {
        self.hits
            .lock()
            .expect("hits")
            .iter()
            .filter(|p| *p == path)
            .count()
    }

    /// Waits until `path` has been asked for at least `n` times.
    pub fn wait_hits(&self, path: &str, n: usize) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.hits(path) >= n {
                return true;
            }
            thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

fn server_config((chain, key): (&str, &str)) -> anyhow::Result<ServerConfig> {
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(chain.as_bytes()).collect::<Result<_, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes())?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Ok(ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?)
}

fn serve(
    tcp: TcpStream,
    tls: Option<Arc<ServerConfig>>,
    answers: &Answers,
    hits: &Mutex<Vec<String>>,
) -> anyhow::Result<()> {
    tcp.set_nonblocking(false)?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    match tls {
        Some(config) => {
            let conn = ServerConnection::new(config)?;
            exchange(StreamOwned::new(conn, tcp), answers, hits)
        }
        None => exchange(tcp, answers, hits),
    }
}

/// One request, one answer, then the connection closes.
fn exchange(
    mut io: impl Read + Write,
    answers: &Answers,
    hits: &Mutex<Vec<String>>,
) -> anyhow::Result<()> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 16 * 1024 {
        if io.read(&mut byte)? == 0 {
            return Ok(());
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head);
    let path = text.split(' ').nth(1).unwrap_or("").to_string();
    hits.lock().expect("hits").push(path.clone());
    let answer = answers
        .lock()
        .expect("answers")
        .get(&path)
        .cloned()
        .unwrap_or_else(|| Answer::status(404));
    thread::sleep(answer.delay);
    let location = answer
        .location
        .map(|l| format!("Location: {l}\r\n"))
        .unwrap_or_default();
    let reply = format!(
        "HTTP/1.1 {} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{location}Connection: close\r\n\r\n{}",
        answer.status,
        answer.body.len(),
        answer.body
    );
    io.write_all(reply.as_bytes())?;
    io.flush()?;
    Ok(())
}

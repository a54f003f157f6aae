//! The request-layer lab: certificates minted per test, a stand-in Exchange backend that
//! records what reaches it and plays NTLM's connection-bound handshake, and a TLS client
//! that can send any bytes at all.

use std::{
    collections::HashMap,
    fs,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread,
    time::Duration,
};

use anyhow::{bail, Context};
use base64::{engine::general_purpose::STANDARD, Engine as _};
use bytes::Bytes;
use ewsgate::identity::{
    auth::{self, Credential, NtlmStage},
    tokens::testkit,
};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, server::conn::http1, service::service_fn, Request, Response};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName};

use crate::lab::Netns;

pub const SERVER_NAME: &str = "mail.example.org";
pub const BACKEND: &str = "127.0.0.1:8080";

/// Certificates for one lab: a CA, the gate's server certificate, an Exchange token-signing
/// certificate, and a client certificate for an office phone.
pub struct Pki {
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub signer: testkit::Signer,
    ca_params: rcgen::CertificateParams,
    ca_key: rcgen::KeyPair,
}

impl Pki {
    pub fn new(dir: &Path) -> anyhow::Result<Pki> {
        fs::create_dir_all(dir)?;
        let ca_key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "ewsgate lab CA");
        let ca_cert = params.self_signed(&ca_key)?;
        let ca_params = params;
        let ca = dir.join("ca.pem");
        fs::write(&ca, ca_cert.pem())?;
        let signer = testkit::signer();
        fs::write(dir.join("exchange-auth.pem"), &signer.pem_cert)?;
        let pki = Pki {
            dir: dir.into(),
            ca,
            signer,
            ca_params,
            ca_key,
        };
        pki.server_cert("gate")?;
        pki.client_cert("phone-0042")?;
        Ok(pki)
    }

    /// Writes `<name>.pem` and `<name>.key` for the gate (its name and both addresses).
    pub fn server_cert(&self, name: &str) -> anyhow::Result<()> {
        self.server_cert_for(
            name,
            &[SERVER_NAME, crate::lab::GATE_V4, crate::lab::GATE_V6],
        )
    }

    /// Writes `<name>.pem` and `<name>.key` for a server known by `names` (DNS names or
    /// addresses).
    pub fn server_cert_for(&self, name: &str, names: &[&str]) -> anyhow::Result<()> {
        let key = rcgen::KeyPair::generate()?;
        let params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        let issuer = rcgen::Issuer::new(self.ca_params.clone(), &self.ca_key);
        let cert = params.signed_by(&key, &issuer)?;
        fs::write(self.dir.join(format!("{name}.pem")), cert.pem())?;
        fs::write(self.dir.join(format!("{name}.key")), key.serialize_pem())?;
        Ok(())
    }

    /// A certificate for `names` (DNS names or IP addresses) from the lab CA, as PEM chain
    /// and PEM key, for the test's own servers.
    pub fn leaf(&self, names: &[&str]) -> anyhow::Result<(String, String)> {
        let key = rcgen::KeyPair::generate()?;
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let params = rcgen::CertificateParams::new(names)?;
        let issuer = rcgen::Issuer::new(self.ca_params.clone(), &self.ca_key);
        let cert = params.signed_by(&key, &issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    fn client_cert(&self, cn: &str) -> anyhow::Result<()> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let issuer = rcgen::Issuer::new(self.ca_params.clone(), &self.ca_key);
        let cert = params.signed_by(&key, &issuer)?;
        fs::write(self.dir.join(format!("{cn}.pem")), cert.pem())?;
        fs::write(self.dir.join(format!("{cn}.key")), key.serialize_pem())?;
        Ok(())
    }

    /// A callback token for `item`, valid now, with `edit` applied to its claims.
    pub fn token(&self, edit: impl FnOnce(serde_json::Value) -> serde_json::Value) -> String {
        let claims = edit(testkit::callback_claims_at(now()));
        testkit::sign(&self.signer, &claims)
    }
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// One request as the backend saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub connection: u64,
    pub method: String,
    pub path: String,
    pub headers: HashMap<String, Vec<String>>,
    pub body_bytes: u64,
    /// The user the backend's NTLM emulation had authenticated on that connection.
    pub user: Option<String>,
    /// The SOAP operation, when the body was SOAP.
    pub operation: Option<String>,
    /// The item and attachment IDs it named.
    pub items: Vec<String>,
}

/// Bodies up to this are kept to be answered; larger ones are only counted.
const KEEP_BODY: usize = 1 << 20;

impl Seen {
    pub fn header(&self, name: &str) -> Vec<String> {
        self.headers.get(name).cloned().unwrap_or_default()
    }
}

/// The stand-in Exchange: HTTP on the gate's loopback.
pub struct Backend {
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// What `GET /autodiscover/metadata/json/1` answers: status, body, `Location`.
    pub metadata: Arc<Mutex<(u16, String, Option<String>)>>,
    _runtime: tokio::runtime::Runtime,
}

impl Backend {
    pub fn start(gate: &Netns) -> anyhow::Result<Backend> {
        let listener = gate
            .run(|| std::net::TcpListener::bind(BACKEND))
            .context("backend bind")?;
        listener.set_nonblocking(true)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let seen: Arc<Mutex<Vec<Seen>>> = Default::default();
        let record = seen.clone();
        let mailbox = Arc::new(crate::mailbox::Mailbox::default());
        let metadata: Arc<Mutex<(u16, String, Option<String>)>> =
            Arc::new(Mutex::new((404, String::new(), None)));
        let served = metadata.clone();
        runtime.spawn(async move {
            let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                return;
            };
            let ids = Arc::new(AtomicU64::new(1));
            while let Ok((tcp, _)) = listener.accept().await {
                let id = ids.fetch_add(1, Ordering::Relaxed);
                let record = record.clone();
                let user: Arc<Mutex<Option<String>>> = Default::default();
                let mailbox = mailbox.clone();
                let served = served.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let ex = Exchange {
                            connection: id,
                            user: user.clone(),
                            record: record.clone(),
                            mailbox: mailbox.clone(),
                            metadata: served.clone(),
                        };
                        exchange(req, ex)
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        Ok(Backend {
            seen,
            metadata,
            _runtime: runtime,
        })
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }

    pub fn clear(&self) {
        if let Ok(mut s) = self.seen.lock() {
            s.clear();
        }
    }
}

/// A request header that makes the stand-in close its connection after the answer.
pub const CLOSE_AFTER: &str = "x-test-close-after";

/// The user the stand-in's connection runs as after a Kerberos ticket.
pub const KERBEROS_USER: &str = "EXAMPLE\\kerberos";

/// Answers like Exchange behind IIS: NTLM's Type 1 gets a challenge, Type 3 authenticates
/// the connection, later requests on it run as that user; so does a Kerberos ticket. Anything else is answered 200:
/// the stand-in checks nothing itself, so every request that reaches it is ewsgate's doing.
/// One backend connection's state.
struct Exchange {
    connection: u64,
    user: Arc<Mutex<Option<String>>>,
    record: Arc<Mutex<Vec<Seen>>>,
    mailbox: Arc<crate::mailbox::Mailbox>,
    metadata: Arc<Mutex<(u16, String, Option<String>)>>,
}

async fn exchange(
    req: Request<Incoming>,
    ex: Exchange,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let Exchange {
        connection,
        user,
        record,
        mailbox,
        metadata,
    } = ex;
    if req.uri().path().starts_with("/autodiscover/metadata/") {
        let (status, body, location) = metadata.lock().map(|m| m.clone()).unwrap_or_default();
        if let Ok(mut r) = record.lock() {
            r.push(Seen {
                connection,
                method: req.method().to_string(),
                path: req.uri().to_string(),
                headers: HashMap::new(),
                body_bytes: 0,
                user: None,
                operation: None,
                items: Vec::new(),
            });
        }
        let mut resp = Response::new(Full::new(Bytes::from(body)));
        *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or_default();
        if let Some(l) = location.and_then(|l| l.parse().ok()) {
            resp.headers_mut().insert("location", l);
        }
        return Ok(resp);
    }
    let (parts, mut body) = req.into_parts();
    let mut body_bytes = 0u64;
    let mut kept = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Some(d) = frame?.data_ref() {
            body_bytes += d.len() as u64;
            if kept.len() < KEEP_BODY {
                kept.extend_from_slice(d);
            }
        }
    }
    let credential = auth::classify(parts.headers.get("authorization").map(|v| v.as_bytes()));
    // A test asks the stand-in to close its connection after this answer, as IIS may.
    let close = parts.headers.contains_key(CLOSE_AFTER);
    let mut status = 200;
    let mut challenge = None;
    match credential {
        Credential::Ntlm {
            stage: NtlmStage::Negotiate,
            ..
        } => {
            status = 401;
            challenge = Some(format!(
                "NTLM {}",
                STANDARD.encode(b"NTLMSSP\0\x02\0\0\0challenge")
            ));
        }
        Credential::Ntlm {
            stage: NtlmStage::Authenticate { user: u },
            ..
        } => {
            if let Ok(mut slot) = user.lock() {
                *slot = Some(u);
            }
        }
        // IIS keeps Kerberos authentication on the connection too (`authPersistNonNTLM`,
        // on by default). The stand-in cannot read the ticket, so it names the user so.
        Credential::Kerberos => {
            if let Ok(mut slot) = user.lock() {
                *slot = Some(KERBEROS_USER.to_string());
            }
        }
        _ => {}
    }
    let current = user.lock().ok().and_then(|u| u.clone());
    let mut headers: HashMap<String, Vec<String>> = HashMap::new();
    for (k, v) in &parts.headers {
        headers
            .entry(k.as_str().to_string())
            .or_default()
            .push(String::from_utf8_lossy(v.as_bytes()).into_owned());
    }
    let soap = ewsgate::soap::parse_request(&kept, true, Default::default()).ok();
    if let Ok(mut r) = record.lock() {
        r.push(Seen {
            connection,
            method: parts.method.to_string(),
            path: parts.uri.to_string(),
            headers,
            body_bytes,
            user: current.clone(),
            operation: soap.as_ref().map(|s| s.operation.clone()),
            items: soap
                .map(|s| [s.items, s.attachments].concat())
                .unwrap_or_default(),
        });
    }
    let answer = (status == 200 && body_bytes as usize == kept.len())
        .then(|| mailbox.answer(&kept))
        .flatten();
    let soap = answer.is_some();
    let text = answer
        .unwrap_or_else(|| format!("<ok connection=\"{connection}\" bytes=\"{body_bytes}\"/>"));
    let mut resp = Response::new(Full::new(Bytes::from(text)));
    if soap {
        resp.headers_mut()
            .insert("content-type", "text/xml; charset=utf-8".parse().unwrap());
    }
    *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or_default();
    let h = resp.headers_mut();
    h.insert("x-backend-connection", connection.into());
    if close {
        h.insert(
            "connection",
            hyper::header::HeaderValue::from_static("close"),
        );
    }
    if let Some(u) = current.and_then(|u| u.parse().ok()) {
        h.insert("x-backend-user", u);
    }
    if let Some(c) = challenge.and_then(|c| c.parse().ok()) {
        h.insert("www-authenticate", c);
    }
    Ok(resp)
}

/// A reply as the client read it.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A TLS client from a lab host; writes whatever it is told to.
pub struct Https {
    tls: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
}

impl Https {
    pub fn connect(
        ns: &Netns,
        to: SocketAddr,
        pki: &Pki,
        client_cert: Option<&str>,
    ) -> anyhow::Result<Https> {
        let tcp = ns.run(move || TcpStream::connect_timeout(&to, Duration::from_secs(2)))?;
        tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(&pki.ca)? {
            roots.add(c?)?;
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots);
        let config = match client_cert {
            Some(cn) => {
                let chain = CertificateDer::pem_file_iter(pki.dir.join(format!("{cn}.pem")))?
                    .collect::<Result<Vec<_>, _>>()?;
                let key = PrivateKeyDer::from_pem_file(pki.dir.join(format!("{cn}.key")))?;
                builder.with_client_auth_cert(chain, key)?
            }
            None => builder.with_no_client_auth(),
        };
        let conn =
            rustls::ClientConnection::new(Arc::new(config), ServerName::try_from(SERVER_NAME)?)?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        tls.flush()?;
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(&mut tls.sock)?;
        }
        Ok(Https { tls })
    }

    /// The certificate the gate presented.
    pub fn server_cert(&self) -> Vec<u8> {
        self.tls
            .conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.to_vec())
            .unwrap_or_default()
    }

    pub fn send(&mut self, raw: &[u8]) -> std::io::Result<()> {
        self.tls.write_all(raw)?;
        self.tls.flush()
    }

    /// A POST to the EWS endpoint with `headers` and a body.
    pub fn ews(&mut self, headers: &[(&str, &str)], body: &[u8]) -> anyhow::Result<Reply> {
        self.request("POST", "/EWS/Exchange.asmx", headers, body)
    }

    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> anyhow::Result<Reply> {
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {SERVER_NAME}\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        let mut raw = head.into_bytes();
        raw.extend_from_slice(body);
        self.send(&raw)?;
        self.read_reply()
    }

    /// Reads one response (Content-Length or chunked body).
    pub fn read_reply(&mut self) -> anyhow::Result<Reply> {
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while !buf.ends_with(b"\r\n\r\n") {
            if self.tls.read(&mut byte)? == 0 {
                bail!(
                    "connection closed before a response ({} bytes read)",
                    buf.len()
                );
            }
            buf.push(byte[0]);
            if buf.len() > 64 * 1024 {
                bail!("response head too large");
            }
        }
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        resp.parse(&buf)?;
        let status = resp.code.context("status")?;
        let headers: Vec<(String, String)> = resp
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_string(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect();
        let mut reply = Reply {
            status,
            headers,
            body: String::new(),
        };
        let body = if let Some(n) = reply.header("content-length") {
            let mut b = vec![0u8; n.trim().parse()?];
            self.tls.read_exact(&mut b)?;
            b
        } else if reply.header("transfer-encoding").is_some() {
            self.read_chunked()?
        } else {
            Vec::new()
        };
        reply.body = String::from_utf8_lossy(&body).into_owned();
        Ok(reply)
    }

    fn read_chunked(&mut self) -> anyhow::Result<Vec<u8>> {
        let mut out = Vec::new();
        loop {
            let line = self.read_line()?;
            let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)?;
            if size == 0 {
                while !self.read_line()?.is_empty() {}
                return Ok(out);
            }
            let mut b = vec![0u8; size + 2];
            self.tls.read_exact(&mut b)?;
            out.extend_from_slice(&b[..size]);
        }
    }

    fn read_line(&mut self) -> anyhow::Result<String> {
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while !line.ends_with(b"\r\n") {
            if self.tls.read(&mut byte)? == 0 {
                bail!("connection closed");
            }
            line.push(byte[0]);
        }
        line.truncate(line.len() - 2);
        Ok(String::from_utf8_lossy(&line).into_owned())
    }

    /// True when the gate closed the connection (EOF or reset) within `wait`.
    pub fn closed_within(&mut self, wait: Duration) -> bool {
        let _ = self.tls.sock.set_read_timeout(Some(wait));
        let mut b = [0u8; 1];
        matches!(self.tls.read(&mut b), Ok(0) | Err(_)) && {
            // A timeout is not a close.
            let again = self.tls.read(&mut b);
            !matches!(again, Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock)
        }
    }
}

/// The lines of the audit log, parsed.
pub fn audit_lines(path: &Path) -> Vec<serde_json::Value> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Waits until the audit log holds a line for which `pred` holds.
pub fn wait_audit(
    path: &Path,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> Option<serde_json::Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        if let Some(v) = audit_lines(path).into_iter().rev().find(|v| pred(v)) {
            return Some(v);
        }
        thread::sleep(Duration::from_millis(20));
    }
    None
}

//! Handshake: TLS with the policy's server config, within the handshake timeout. A verified
//! client certificate names its subject for the identity phase.

use std::{net::SocketAddr, sync::Arc};

use bytes::BytesMut;
use tokio::net::TcpStream;

use crate::{
    model::outcome::{Decision, FailureClass},
    net::sock::Sock,
    proxy::{
        context::ConnInfo, phases::logging, session::Conn, state::State, tls::client_identity,
        Shared,
    },
};

pub async fn run(
    shared: &Shared,
    state: &State,
    tcp: TcpStream,
    peer: SocketAddr,
    group: Option<Arc<str>>,
    id: u64,
) -> Option<Conn> {
    let limit = state.settings.limits.handshake_timeout;
    let tls = match tokio::time::timeout(limit, state.acceptor.accept(Sock::new(tcp))).await {
        Ok(Ok(tls)) => tls,
        // The client went away: a closed connection is no protocol failure.
        Ok(Err(e)) if gone(&e) => {
            return refuse(shared, peer, group, "tls_handshake_aborted", None)
        }
        Ok(Err(_)) => return refuse(shared, peer, group, "tls_handshake_failed", PROTOCOL),
        Err(_) => return refuse(shared, peer, group, "tls_handshake_timeout", PROTOCOL),
    };
    let client_cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(client_identity)
        .map(Arc::from);
    Some(Conn {
        info: Arc::new(ConnInfo {
            id,
            peer,
            group,
            client_cert,
        }),
        tls,
        buf: BytesMut::new(),
        bound: None,
        last_token: None,
    })
}

const PROTOCOL: Option<FailureClass> = Some(FailureClass::Protocol);

/// The client closed or reset the connection mid-handshake.
fn gone(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        UnexpectedEof | ConnectionReset | BrokenPipe | ConnectionAborted
    )
}

fn refuse(
    shared: &Shared,
    peer: SocketAddr,
    group: Option<Arc<str>>,
    reason: &str,
    failure: Option<FailureClass>,
) -> Option<Conn> {
    logging::connection(
        shared,
        peer,
        group.as_deref(),
        Decision::Deny,
        reason,
        failure,
    );
    None
}

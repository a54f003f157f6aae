//! Handshake: TLS with the policy's server config, within the handshake timeout. A verified
//! client certificate names its subject for the identity phase.

use std::{net::SocketAddr, sync::Arc};

use bytes::BytesMut;
use tokio::net::TcpStream;

use crate::{
    model::outcome::{Decision, FailureClass},
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
    let tls = match tokio::time::timeout(limit, state.acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(_)) => return refuse(shared, peer, group, "tls_handshake_failed"),
        Err(_) => return refuse(shared, peer, group, "tls_handshake_timeout"),
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
        session: None,
        bound: None,
    })
}

fn refuse(
    shared: &Shared,
    peer: SocketAddr,
    group: Option<Arc<str>>,
    reason: &str,
) -> Option<Conn> {
    logging::connection(
        shared,
        peer,
        group.as_deref(),
        Decision::Deny,
        reason,
        Some(FailureClass::Protocol),
    );
    None
}

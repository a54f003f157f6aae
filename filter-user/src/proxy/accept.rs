//! Accept: the first phase. The source gets the packet layer's answer again, from the same
//! order as the XDP program (block set, allowed groups, dynamic allows): a connection that
//! came around XDP (a tunnel ending on the gate, an interface the program does not run on)
//! is refused here exactly as XDP would have dropped it. Then the per-source cap.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use tokio::net::{TcpListener, TcpStream};
use tracing::warn;

use crate::{
    model::outcome::Decision,
    proxy::{admission::canonical, handshake, phases::logging, session, state::State, Shared},
};

pub async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        // The audit writer far behind: stop taking connections until it catches up, so
        // that no decision goes unrecorded and memory stays bounded.
        while shared.audit.backlog() > 2 * shared.state.load().settings.limits.audit_backlog {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and friends: back off rather than spin.
                warn!(error = %e, "accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let peer = SocketAddr::new(canonical(peer.ip()), peer.port());
        let state = shared.state.load_full();
        let Some(group) = admit(&shared, &state, peer) else {
            continue;
        };
        match Slot::take(&shared, &state, peer.ip()) {
            Some(slot) => {
                tokio::spawn(connection(shared.clone(), state, tcp, peer, group, slot));
            }
            None => logging::connection(
                &shared,
                peer,
                group.as_deref(),
                Decision::Deny,
                "too_many_connections",
                None,
            ),
        }
    }
}

/// The packet layer's verdict for `peer`; `None` when the connection is refused. In
/// monitor mode nothing is refused: the verdict is audited as `would-deny`.
fn admit(shared: &Shared, state: &State, peer: SocketAddr) -> Option<Option<Arc<str>>> {
    let id = state.sources.id(peer.ip());
    let verdict = shared.dynamic.admit(peer.ip(), id);
    let group: Option<Arc<str>> = id.and_then(|i| state.group_name(i)).map(Arc::from);
    if verdict.allowed() {
        return Some(group);
    }
    let monitor = state.config.xdp.monitor;
    let decision = if monitor {
        Decision::WouldDeny
    } else {
        Decision::Deny
    };
    logging::connection(
        shared,
        peer,
        group.as_deref(),
        decision,
        verdict.reason(),
        None,
    );
    monitor.then_some(group)
}

async fn connection(
    shared: Arc<Shared>,
    state: Arc<State>,
    tcp: TcpStream,
    peer: SocketAddr,
    group: Option<Arc<str>>,
    slot: Slot,
) {
    let _slot = slot;
    let _open = shared.metrics.connection();
    let _ = tcp.set_nodelay(true);
    let id = shared.next_connection.fetch_add(1, Ordering::Relaxed);
    if let Some(conn) = handshake::run(&shared, &state, tcp, peer, group, id).await {
        session::serve(shared, state, conn).await;
    }
}

/// One of a source's connection slots, given back on drop.
struct Slot {
    shared: Arc<Shared>,
    ip: IpAddr,
}

impl Slot {
    fn take(shared: &Arc<Shared>, state: &State, ip: IpAddr) -> Option<Slot> {
        let cap = state.settings.limits.connections_per_source;
        let mut map = shared.per_source.lock().ok()?;
        let n = map.entry(ip).or_insert(0);
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(Slot {
            shared: shared.clone(),
            ip,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut map) = self.shared.per_source.lock() {
            if let Some(n) = map.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&self.ip);
                }
            }
        }
    }
}

pub type PerSource = std::sync::Mutex<HashMap<IpAddr, usize>>;

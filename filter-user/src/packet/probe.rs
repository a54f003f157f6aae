//! Asking the running XDP program what it does with one packet: a TCP SYN from a source to a
//! protected endpoint is built here and run through the loaded program with
//! BPF_PROG_TEST_RUN. The verdict is the program's return value; the reason is the one
//! per-reason counter the run moved (the counters are the program's own, so the answer is
//! the program's, not a model of it).

use std::net::IpAddr;

use aya::programs::{TestRun, TestRunOptions};
use filter_common::Reason;
use serde::{Deserialize, Serialize};

use crate::packet::xdp::{Gate, XdpError};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const ETH_HEADER: usize = 14;
const IPV4_HEADER: usize = 20;
const IPV6_HEADER: usize = 40;
const TCP_HEADER: usize = 20;
const TCP_PROTOCOL: u8 = 6;
const TCP_SYN: u8 = 0x02;

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("source {source_addr} and destination {dest} are of different address families")]
    Family { source_addr: IpAddr, dest: IpAddr },
    #[error("the XDP program: {0}")]
    Program(#[from] XdpError),
    #[error("BPF_PROG_TEST_RUN: {0}")]
    Run(String),
    #[error("reading the program's counters: {0}")]
    Counters(String),
    #[error("the program returned {0}, which is neither XDP_PASS nor XDP_DROP")]
    Action(u32),
}

/// What the program did with the probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PacketVerdict {
    /// `pass` or `drop`: what happened to the packet.
    pub action: String,
    /// The counter the packet was counted under (`allow_group`, `drop_not_allowed`, ...).
    pub reason: String,
    /// Monitor mode passed a packet that would have been dropped.
    pub monitor: bool,
    /// How the verdict was found.
    pub by: String,
    /// Other counters of the same verdict that moved during the run (live traffic): when
    /// not empty, the reason is the program's first check among those that moved.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub also_moved: Vec<String>,
}

impl PacketVerdict {
    /// True when the packet would be dropped (in monitor mode: would have been).
    pub fn drops(&self) -> bool {
        self.action == "drop" || self.monitor
    }
}

/// An Ethernet frame holding a TCP SYN from `src` to `dst`:`port`. Checksums are left zero:
/// the program reads none.
pub fn syn_frame(src: IpAddr, dst: IpAddr, port: u16) -> Result<Vec<u8>, ProbeError> {
    let mut f = Vec::with_capacity(ETH_HEADER + IPV6_HEADER + TCP_HEADER);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]); // destination MAC
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]); // source MAC
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            f.extend_from_slice(&0x0800u16.to_be_bytes());
            let total = (IPV4_HEADER + TCP_HEADER) as u16;
            f.extend_from_slice(&[0x45, 0]);
            f.extend_from_slice(&total.to_be_bytes());
            f.extend_from_slice(&[0, 1, 0x40, 0]); // id 1, don't fragment
            f.extend_from_slice(&[64, TCP_PROTOCOL, 0, 0]);
            f.extend_from_slice(&s.octets());
            f.extend_from_slice(&d.octets());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            f.extend_from_slice(&0x86ddu16.to_be_bytes());
            f.extend_from_slice(&[0x60, 0, 0, 0]);
            f.extend_from_slice(&(TCP_HEADER as u16).to_be_bytes());
            f.extend_from_slice(&[TCP_PROTOCOL, 64]);
            f.extend_from_slice(&s.octets());
            f.extend_from_slice(&d.octets());
        }
        _ => {
            return Err(ProbeError::Family {
                source_addr: src,
                dest: dst,
            })
        }
    }
    f.extend_from_slice(&40000u16.to_be_bytes());
    f.extend_from_slice(&port.to_be_bytes());
    f.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0]); // sequence, acknowledgement
    f.extend_from_slice(&[0x50, TCP_SYN]);
    f.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]); // window, checksum, urgent
    Ok(f)
}

/// Runs a SYN from `src` to `dst`:`port` through the gate's loaded program once.
pub fn probe(
    gate: &mut Gate,
    src: IpAddr,
    dst: IpAddr,
    port: u16,
) -> Result<PacketVerdict, ProbeError> {
    let frame = syn_frame(src, dst, port)?;
    let before = counters(gate)?;
    let returned = {
        let prog = gate.program()?;
        let opts = TestRunOptions {
            data_in: Some(&frame),
            ..Default::default()
        };
        prog.test_run(opts)
            .map_err(|e| ProbeError::Run(e.to_string()))?
            .return_value
    };
    let after = counters(gate)?;
    let moved: Vec<Reason> = Reason::ALL
        .iter()
        .zip(before.iter().zip(&after))
        .filter(|(_, (b, a))| a > b)
        .map(|(r, _)| *r)
        .collect();
    verdict(returned, &moved)
}

fn counters(gate: &Gate) -> Result<Vec<u64>, ProbeError> {
    let c = gate
        .maps
        .counters()
        .map_err(|e| ProbeError::Counters(e.to_string()))?;
    Ok(c.into_iter().map(|(_, n)| n).collect())
}

/// The verdict from the return value and the counters that moved. Live traffic may move
/// other counters in the same instant; only a reason that agrees with the return value is
/// taken, in the program's order of checks.
fn verdict(returned: u32, moved: &[Reason]) -> Result<PacketVerdict, ProbeError> {
    let has = |r: Reason| moved.contains(&r);
    let monitor = returned == XDP_PASS && has(Reason::MonitorPassed);
    let pick = |order: &[Reason]| order.iter().copied().find(|r| has(*r));
    let drops = [Reason::Blocked, Reason::NotAllowed, Reason::Malformed];
    let passes = [Reason::AllowGroup, Reason::AllowDynamic, Reason::NotBound];
    let (action, reason) = match returned {
        XDP_DROP => ("drop", pick(&drops)),
        XDP_PASS if monitor => ("pass", pick(&drops)),
        XDP_PASS => ("pass", pick(&passes)),
        other => return Err(ProbeError::Action(other)),
    };
    let class: &[Reason] = if action == "drop" || monitor {
        &drops
    } else {
        &passes
    };
    let also_moved = class
        .iter()
        .filter(|r| has(**r) && Some(**r) != reason)
        .map(|r| r.name().to_string())
        .collect();
    Ok(PacketVerdict {
        action: action.into(),
        reason: reason
            .map_or("unknown (no counter moved)", Reason::name)
            .into(),
        monitor,
        by: "the running XDP program (BPF_PROG_TEST_RUN)".into(),
        also_moved,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_have_the_right_shape() {
        let v4 = syn_frame(
            "198.51.100.10".parse().unwrap(),
            "192.0.2.10".parse().unwrap(),
            443,
        )
        .unwrap();
        assert_eq!(v4.len(), ETH_HEADER + IPV4_HEADER + TCP_HEADER);
        assert_eq!(&v4[12..14], &[0x08, 0x00]);
        assert_eq!(&v4[26..30], &[198, 51, 100, 10]);
        assert_eq!(&v4[36..38], &443u16.to_be_bytes());
        let v6 = syn_frame(
            "2001:db8:100::10".parse().unwrap(),
            "2001:db8:10::10".parse().unwrap(),
            443,
        )
        .unwrap();
        assert_eq!(v6.len(), ETH_HEADER + IPV6_HEADER + TCP_HEADER);
        assert!(syn_frame(
            "198.51.100.10".parse().unwrap(),
            "2001:db8:10::10".parse().unwrap(),
            443
        )
        .is_err());
    }

    #[test]
    fn the_reason_must_agree_with_the_return_value() {
        let v = verdict(XDP_DROP, &[Reason::AllowGroup, Reason::NotAllowed]).unwrap();
        assert_eq!(
            (v.action.as_str(), v.reason.as_str()),
            ("drop", "drop_not_allowed")
        );
        let v = verdict(XDP_DROP, &[Reason::Blocked, Reason::NotAllowed]).unwrap();
        assert_eq!(v.reason, "drop_blocked");
        assert_eq!(v.also_moved, vec!["drop_not_allowed".to_string()]);
        let v = verdict(XDP_PASS, &[Reason::NotAllowed, Reason::MonitorPassed]).unwrap();
        assert!(v.monitor && v.drops());
        assert_eq!(v.reason, "drop_not_allowed");
        let v = verdict(XDP_PASS, &[Reason::AllowGroup]).unwrap();
        assert!(!v.drops());
        assert!(verdict(0, &[]).is_err());
    }
}

//! Paths around the program: interfaces that are up and do not run it. Packets arriving
//! there reach the protected addresses without an XDP verdict (only the proxy's check at
//! accept stands), so `ewsgate status` names them.
//!
//! Every up interface other than loopback counts, whatever addresses it holds: a protected
//! address is reachable through any interface the host routes from. Loopback carries only
//! the host's own packets. Tunnel devices count too: the program opens the tunnels it knows
//! on the interface the outer packet arrives through, but a tunnel kind it does not open
//! (or one whose outer packets arrive through an unlisted interface) delivers its inner
//! packets there unjudged.

use std::{collections::BTreeMap, ffi::CStr, fs};

/// One interface the program does not run on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unfiltered {
    pub name: String,
    /// What the kernel calls its link type (`ether`, `ipip`, `gre`, ...), when known.
    pub kind: String,
}

impl Unfiltered {
    /// The line `ewsgate status` prints.
    pub fn warning(&self) -> String {
        format!(
            "interface {} ({}) is up and does not run the XDP program: packets arriving there \
             reach the protected addresses with no packet-layer verdict (the proxy still \
             refuses disallowed sources at accept); add it to xdp.interfaces or take it down",
            self.name, self.kind
        )
    }
}

/// Up, non-loopback interfaces of this network namespace not in `attached`.
pub fn unfiltered(attached: &BTreeMap<String, String>) -> Vec<Unfiltered> {
    interfaces()
        .into_iter()
        .filter(|(name, flags)| {
            flags & libc::IFF_UP as u32 != 0
                && flags & libc::IFF_LOOPBACK as u32 == 0
                && !attached.contains_key(name)
        })
        .map(|(name, _)| Unfiltered {
            kind: link_kind(&name),
            name,
        })
        .collect()
}

/// Every interface of this network namespace with its flags (if_nameindex, SIOCGIFFLAGS:
/// unlike /sys/class/net, these always answer for the caller's own namespace).
fn interfaces() -> Vec<(String, u32)> {
    let mut out = Vec::new();
    // SAFETY: a plain datagram socket, closed below, used only for the flags ioctl.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return out;
    }
    // SAFETY: if_nameindex returns an array ended by a zero entry, freed below.
    let list = unsafe { libc::if_nameindex() };
    if !list.is_null() {
        let mut i = 0;
        loop {
            // SAFETY: within the array, up to and including its terminating entry.
            let entry = unsafe { &*list.add(i) };
            if entry.if_index == 0 || entry.if_name.is_null() {
                break;
            }
            // SAFETY: if_name is a NUL-terminated string owned by the array.
            let name = unsafe { CStr::from_ptr(entry.if_name) };
            if let Some(flags) = flags(sock, name) {
                out.push((name.to_string_lossy().into_owned(), flags));
            }
            i += 1;
        }
        // SAFETY: the array if_nameindex returned.
        unsafe { libc::if_freenameindex(list) };
    }
    // SAFETY: our own socket.
    unsafe { libc::close(sock) };
    out
}

fn flags(sock: i32, name: &CStr) -> Option<u32> {
    // SAFETY: a zeroed ifreq is valid; the name is copied in bounds below.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.to_bytes();
    if bytes.len() >= req.ifr_name.len() {
        return None;
    }
    for (d, s) in req.ifr_name.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS fills ifr_flags of the ifreq we own.
    if unsafe { libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut req) } != 0 {
        return None;
    }
    // SAFETY: the union member SIOCGIFFLAGS wrote.
    Some(unsafe { req.ifr_ifru.ifru_flags } as u16 as u32)
}

/// The link type from sysfs (ARPHRD_*), for the warning; `unknown` where sysfs shows
/// another namespace or nothing.
fn link_kind(name: &str) -> String {
    let kind = fs::read_to_string(format!("/sys/class/net/{name}/type")).ok();
    match kind.as_deref().map(str::trim) {
        Some("1") => "ether",
        Some("768") => "ipip",
        Some("769") => "ip6tnl",
        Some("776") => "sit",
        Some("778") => "gre",
        Some("823") => "ip6gre",
        Some("512") => "ppp",
        Some("65534") => "tun",
        Some(_) => "other",
        None => "unknown",
    }
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_never_counts_and_attached_interfaces_do_not_either() {
        let all: BTreeMap<String, String> = interfaces()
            .into_iter()
            .map(|(n, _)| (n, "native".to_string()))
            .collect();
        assert!(unfiltered(&all).is_empty());
        assert!(unfiltered(&BTreeMap::new())
            .iter()
            .all(|u| u.name != "lo" && !u.warning().is_empty()));
    }
}

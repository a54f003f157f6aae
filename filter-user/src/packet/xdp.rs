//! Loading, adopting, attaching and removing the XDP program.
//!
//! Everything lives under `<pin_dir>/v<LAYOUT_VERSION>/`: `maps/<NAME>`, `prog`, and one
//! pinned link per interface, `links/<ifname>@<mode>`. The link is pinned because an unpinned
//! XDP link detaches when the daemon dies, which would fail open. A daemon that starts over
//! existing pins checks every map's layout (aya would reuse a pinned map blindly), loads its
//! own program against those maps and swaps it into each link with `bpf_link_update`, so
//! filtering never stops while the daemon restarts or upgrades.

use std::{
    collections::BTreeMap,
    fs, io,
    mem::size_of,
    path::{Path, PathBuf},
};

use aya::{
    maps::{MapInfo, MapType, ProgramArray},
    programs::{links::FdLink, links::PinnedLink, ProgramError, Xdp, XdpMode},
    Ebpf, EbpfError, EbpfLoader,
};
use tracing::{info, warn};

use filter_common::{
    Expiring, Policy, Report, Settings, V6Bucket, DROPS_BYTES, LAYOUT_VERSION, MAX_GROUPS,
    REASON_COUNT, TBL24_ROW, TBL24_ROWS, TBL8_SIZE,
};

use crate::{
    model::{
        packet::{AttachMode, Capacity},
        Config,
    },
    packet::{
        maps::{Maps, MapsError, Sizes},
        tables::v6_bucket_count,
    },
};

/// The XDP object built by build.rs.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ewsgate-xdp"));
pub const PROGRAM: &str = "ewsgate_xdp";
const TUNNEL_PROGRAM: &str = "ewsgate_tunnel";
const REPORT_PROGRAM: &str = "ewsgate_report";
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

#[derive(Debug, thiserror::Error)]
pub enum XdpError {
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("{0}")]
    NotBpfFs(String),
    #[error("pinned map {path} does not match this build ({what}); run `ewsgate detach` first")]
    Incompatible { path: String, what: String },
    #[error("loading the eBPF object: {0}")]
    Load(#[from] EbpfError),
    #[error("program {PROGRAM}: {0}")]
    Program(#[from] ProgramError),
    #[error("interface {iface}: {message}")]
    Attach { iface: String, message: String },
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error("this build has no XDP program (built without the `xdp` feature)")]
    NoObject,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> XdpError + '_ {
    move |source| XdpError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Paths under the versioned pin directory.
#[derive(Debug, Clone)]
pub struct Pins {
    root: PathBuf,
}

impl Pins {
    pub fn new(pin_dir: &Path) -> Pins {
        Pins {
            root: pin_dir.join(format!("v{LAYOUT_VERSION}")),
        }
    }
    pub fn root(&self) -> &Path {
        &self.root
    }
    fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }
    /// Where the map `name` is pinned.
    pub fn map(&self, name: &str) -> PathBuf {
        self.maps().join(name)
    }
    fn prog(&self) -> PathBuf {
        self.root.join("prog")
    }
    fn links(&self) -> PathBuf {
        self.root.join("links")
    }

    /// Pinned links by interface name, with the mode recorded in their file name.
    pub fn pinned_links(&self) -> BTreeMap<String, (String, PathBuf)> {
        let mut out = BTreeMap::new();
        let Ok(dir) = fs::read_dir(self.links()) else {
            return out;
        };
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some((iface, mode)) = name.split_once('@') {
                out.insert(iface.to_string(), (mode.to_string(), entry.path()));
            }
        }
        out
    }
}

enum Size {
    Fixed(u32),
    /// Taken from the config's capacity when the map is created.
    Configured(fn(&Capacity) -> u32),
}

struct Layout {
    name: &'static str,
    kind: MapType,
    key: usize,
    value: usize,
    size: Size,
}

const fn layout(name: &'static str, kind: MapType, key: usize, value: usize, size: Size) -> Layout {
    Layout {
        name,
        kind,
        key,
        value,
        size,
    }
}

const LPM_KEY: usize = 4 + 16;

/// Every map of the object, as this build expects to find it pinned.
fn layouts() -> [Layout; 19] {
    use MapType::*;
    use Size::*;
    [
        layout("SETTINGS", Array, 4, size_of::<Settings>(), Fixed(1)),
        layout("COUNTERS", PerCpuArray, 4, 8, Fixed(REASON_COUNT)),
        layout(
            "GROUP_HITS",
            PerCpuArray,
            4,
            8,
            Fixed(MAX_GROUPS as u32 + 1),
        ),
        layout("POLICY", Array, 4, size_of::<Policy>(), Fixed(2)),
        layout("TAIL", ProgramArray, 4, 4, Fixed(2)),
        layout("INNER", PerCpuArray, 4, 8, Fixed(1)),
        layout("DROPS", RingBuf, 0, 0, Fixed(DROPS_BYTES)),
        layout("WATCH_WINDOW", PerCpuArray, 4, 16, Fixed(1)),
        layout("REPORT", PerCpuArray, 4, size_of::<Report>(), Fixed(1)),
        layout("TBL24_0", Array, 4, TBL24_ROW * 4, Fixed(TBL24_ROWS)),
        layout("TBL24_1", Array, 4, TBL24_ROW * 4, Fixed(TBL24_ROWS)),
        layout(
            "TBL8_0",
            Array,
            4,
            TBL8_SIZE * 4,
            Configured(|c| c.long_prefix_blocks),
        ),
        layout(
            "TBL8_1",
            Array,
            4,
            TBL8_SIZE * 4,
            Configured(|c| c.long_prefix_blocks),
        ),
        layout(
            "V6TBL_0",
            Array,
            4,
            size_of::<V6Bucket>(),
            Configured(|c| v6_bucket_count(c.ipv6_prefixes)),
        ),
        layout(
            "V6TBL_1",
            Array,
            4,
            size_of::<V6Bucket>(),
            Configured(|c| v6_bucket_count(c.ipv6_prefixes)),
        ),
        layout(
            "BLOCK_EXACT",
            Hash,
            16,
            size_of::<Expiring>(),
            Configured(|c| c.dynamic_entries),
        ),
        layout(
            "BLOCK_CIDR",
            LpmTrie,
            LPM_KEY,
            size_of::<Expiring>(),
            Configured(|c| c.dynamic_entries),
        ),
        layout(
            "ALLOW_EXACT",
            Hash,
            16,
            size_of::<Expiring>(),
            Configured(|c| c.dynamic_entries),
        ),
        layout(
            "ALLOW_CIDR",
            LpmTrie,
            LPM_KEY,
            size_of::<Expiring>(),
            Configured(|c| c.dynamic_entries),
        ),
    ]
}

/// What `open` found in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    Fresh,
    Adopted,
}

/// The loaded program, its maps and its links.
pub struct Gate {
    ebpf: Ebpf,
    pub maps: Maps,
    pins: Pins,
    pub start: Start,
    /// Interface → attach mode actually in use.
    pub attached: BTreeMap<String, String>,
}

impl Gate {
    /// Loads (or adopts) and fills the maps from `config`, then attaches. Maps are filled
    /// before the program sees its first packet.
    pub fn open(config: &Config) -> Result<Gate, XdpError> {
        if OBJECT.is_empty() {
            return Err(XdpError::NoObject);
        }
        let pins = Pins::new(&config.xdp.pin_dir);
        prepare_dirs(&config.xdp.pin_dir, &pins)?;
        let (start, sizes) = check_pins(&pins, &config.xdp.capacity)?;
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(pins.maps());
        for l in layouts() {
            if let Size::Configured(f) = l.size {
                loader.map_max_entries(l.name, f(&config.xdp.capacity));
            }
        }
        let mut ebpf = loader.load(OBJECT)?;
        // Load before taking the maps: the program's relocations need their fds.
        program(&mut ebpf)?.load()?;
        install_tails(&mut ebpf)?;
        let maps = Maps::new(&mut ebpf, sizes)?;
        let mut gate = Gate {
            ebpf,
            maps,
            pins,
            start,
            attached: BTreeMap::new(),
        };
        if start == Start::Adopted {
            gate.maps.recount()?;
        }
        // A watcher of the previous agent is gone: send no more drop events.
        gate.maps.set_watch(0)?;
        gate.apply(config)?;
        Ok(gate)
    }

    /// The loaded program, for BPF_PROG_TEST_RUN in tests and benchmarks.
    pub fn program(&mut self) -> Result<&mut Xdp, XdpError> {
        program(&mut self.ebpf)
    }

    /// Applies a validated config. Everything that can fail on the config's content is
    /// checked (interfaces exist, tables fit) before the live state changes.
    pub fn apply(&mut self, config: &Config) -> Result<(), XdpError> {
        for iface in &config.xdp.interfaces {
            if if_index(iface).is_none() {
                return Err(XdpError::Attach {
                    iface: iface.clone(),
                    message: "no such interface".into(),
                });
            }
        }
        self.maps.load(config)?;
        self.attach_all(&config.xdp.interfaces, config.xdp.mode)?;
        Ok(())
    }

    fn attach_all(&mut self, interfaces: &[String], mode: AttachMode) -> Result<(), XdpError> {
        fs::create_dir_all(self.pins.links()).map_err(io_err(&self.pins.links()))?;
        let pinned = self.pins.pinned_links();
        for iface in interfaces {
            let used = match pinned.get(iface) {
                Some((used, path)) if !self.attached.contains_key(iface) => {
                    self.replace(iface, path)?;
                    used.clone()
                }
                Some((used, _)) => used.clone(),
                None => self.attach_new(iface, mode)?,
            };
            self.attached.insert(iface.clone(), used);
        }
        // Interfaces dropped from the config: unpinning the link detaches it.
        for (iface, (_, path)) in pinned {
            if !interfaces.contains(&iface) {
                fs::remove_file(&path).map_err(io_err(&path))?;
                self.attached.remove(&iface);
                info!(%iface, "detached");
            }
        }
        self.pin_program()
    }

    /// Atomically swaps this build's program into a pinned link (bpf_link_update).
    fn replace(&mut self, iface: &str, path: &Path) -> Result<(), XdpError> {
        let attach_err = |message: String| XdpError::Attach {
            iface: iface.into(),
            message,
        };
        let link =
            PinnedLink::from_pin(path).map_err(|e| attach_err(format!("pinned link: {e}")))?;
        let link: FdLink = link.into();
        let link = link
            .try_into()
            .map_err(|e| attach_err(format!("pinned link: {e}")))?;
        let prog = self.program()?;
        let id = prog.attach_to_link(link)?;
        // Forget the link object: the pin keeps the attachment, and dropping an fd link
        // only closes our fd.
        drop(prog.take_link(id)?);
        info!(iface, "adopted pinned link, program replaced");
        Ok(())
    }

    fn attach_new(&mut self, iface: &str, mode: AttachMode) -> Result<String, XdpError> {
        let links = self.pins.links();
        let prog = self.program()?;
        let (id, used) = match mode {
            AttachMode::Native => (prog.attach(iface, XdpMode::Driver)?, "native"),
            AttachMode::Generic => (prog.attach(iface, XdpMode::Skb)?, "generic"),
            AttachMode::Auto => match prog.attach(iface, XdpMode::Driver) {
                Ok(id) => (id, "native"),
                Err(e) => {
                    warn!(iface, error = %e, "native XDP refused, falling back to generic mode");
                    (prog.attach(iface, XdpMode::Skb)?, "generic")
                }
            },
        };
        let link: FdLink = prog
            .take_link(id)?
            .try_into()
            .map_err(|e| XdpError::Attach {
                iface: iface.into(),
                message: format!("kernel gave a netlink attachment, which cannot be pinned: {e}"),
            })?;
        let path = links.join(format!("{iface}@{used}"));
        link.pin(&path).map_err(|e| XdpError::Attach {
            iface: iface.into(),
            message: format!("pin: {e}"),
        })?;
        info!(iface, mode = used, "attached");
        Ok(used.to_string())
    }

    fn pin_program(&mut self) -> Result<(), XdpError> {
        let path = self.pins.prog();
        // The links hold the program; the pin is for tools (bpftool prog show pinned ...).
        let _ = fs::remove_file(&path);
        self.program()?.pin(&path).map_err(|e| XdpError::Io {
            path: path.display().to_string(),
            source: io::Error::other(e.to_string()),
        })
    }

    pub fn pins(&self) -> &Pins {
        &self.pins
    }
}

fn program(ebpf: &mut Ebpf) -> Result<&mut Xdp, XdpError> {
    let prog = ebpf.program_mut(PROGRAM).ok_or(ProgramError::NotLoaded)?;
    Ok(prog.try_into()?)
}

/// Loads the programs the main one tail calls (a tunnel's inner packet, a sampled drop)
/// into the pinned program array. Until they are there, tunnelled packets are dropped and
/// drops are not reported.
fn install_tails(ebpf: &mut Ebpf) -> Result<(), XdpError> {
    for (index, name) in [(0, TUNNEL_PROGRAM), (1, REPORT_PROGRAM)] {
        let prog: &mut Xdp = ebpf
            .program_mut(name)
            .ok_or(ProgramError::NotLoaded)?
            .try_into()?;
        prog.load()?;
        let fd = prog.fd()?.try_clone().map_err(|e| XdpError::Io {
            path: name.into(),
            source: e,
        })?;
        let map = ebpf.map_mut("TAIL").ok_or(MapsError::Missing("TAIL"))?;
        let mut array = ProgramArray::try_from(map).map_err(|source| MapsError::Map {
            name: "TAIL",
            source,
        })?;
        array.set(index, &fd, 0).map_err(|source| MapsError::Map {
            name: "TAIL",
            source,
        })?;
    }
    Ok(())
}

fn if_index(iface: &str) -> Option<u32> {
    let name = std::ffi::CString::new(iface).ok()?;
    // SAFETY: a valid C string.
    let idx = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (idx != 0).then_some(idx)
}

/// Where systemd mounts bpffs, and where the agent mounts it when nothing is there.
pub const BPF_FS_ROOT: &str = "/sys/fs/bpf";
const SYSFS_MAGIC: i64 = 0x6265_6572;

/// Makes sure `pin_dir` is on a bpffs and creates the pin directories. Where `pin_dir` is
/// under /sys/fs/bpf and nothing is mounted there (a host without systemd, a fresh mount
/// namespace), the agent mounts bpffs there as systemd would. Anywhere else it says what
/// to do rather than let a mkdir on another file system fail with a bare errno.
fn prepare_dirs(pin_dir: &Path, pins: &Pins) -> Result<(), XdpError> {
    let root = Path::new(BPF_FS_ROOT);
    if fs_type(&existing_ancestor(pin_dir)) != Some(BPF_FS_MAGIC) {
        if !pin_dir.starts_with(root) {
            return Err(XdpError::NotBpfFs(format!(
                "{} is not on a BPF file system: mount one there (`mount -t bpf bpf DIR` on                  it or a parent) or set xdp.pin_dir under {BPF_FS_ROOT}",
                pin_dir.display()
            )));
        }
        mount_bpffs(root)?;
    }
    fs::create_dir_all(pins.maps()).map_err(io_err(&pins.maps()))?;
    if fs_type(pin_dir) != Some(BPF_FS_MAGIC) {
        return Err(XdpError::NotBpfFs(format!(
            "{} is not on a BPF file system (`mount -t bpf bpf {BPF_FS_ROOT}`)",
            pin_dir.display()
        )));
    }
    Ok(())
}

/// Mounts bpffs at `root` when nothing is mounted there (it is a plain sysfs directory).
fn mount_bpffs(root: &Path) -> Result<(), XdpError> {
    match fs_type(root) {
        Some(SYSFS_MAGIC) => {}
        None => {
            return Err(XdpError::NotBpfFs(format!(
                "{BPF_FS_ROOT} does not exist (is sysfs mounted at /sys?): mount sysfs, then                  `mount -t bpf bpf {BPF_FS_ROOT}`, or set xdp.pin_dir to a directory on a                  BPF file system"
            )))
        }
        Some(other) => {
            return Err(XdpError::NotBpfFs(format!(
                "{BPF_FS_ROOT} holds another file system (type {other:#x}), not bpffs:                  unmount it and `mount -t bpf bpf {BPF_FS_ROOT}`, or set xdp.pin_dir to a                  directory on a BPF file system"
            )))
        }
    }
    let c = |s: &str| std::ffi::CString::new(s).map_err(|e| io_err(root)(io::Error::other(e)));
    let (source, target, kind, data) = (c("bpf")?, c(BPF_FS_ROOT)?, c("bpf")?, c("mode=0700")?);
    // SAFETY: valid NUL-terminated strings; mount(2) reads them only.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            kind.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(XdpError::NotBpfFs(format!(
            "nothing is mounted at {BPF_FS_ROOT} and mounting bpffs there failed ({e}): run              `mount -t bpf bpf {BPF_FS_ROOT}` as root, or set xdp.pin_dir to a directory on              a BPF file system"
        )));
    }
    info!("mounted bpffs at {BPF_FS_ROOT} (nothing was mounted there)");
    Ok(())
}

/// The nearest ancestor of `path` (or itself) that exists.
fn existing_ancestor(path: &Path) -> PathBuf {
    path.ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"))
        .to_path_buf()
}

/// The file system type (statfs f_type) holding `path`, None when it cannot be read.
fn fs_type(path: &Path) -> Option<i64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statfs writes into the struct we pass.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_type as i64)
}

/// Compares every pinned map with this build's layout. Returns whether state is adopted and
/// the sizes in use (a pinned map keeps the size it was created with).
fn check_pins(pins: &Pins, capacity: &Capacity) -> Result<(Start, Sizes), XdpError> {
    let mut found = 0;
    let mut sizes = Sizes {
        tbl8_blocks: capacity.long_prefix_blocks,
        v6_buckets: v6_bucket_count(capacity.ipv6_prefixes),
    };
    let layouts = layouts();
    for l in &layouts {
        let path = pins.maps().join(l.name);
        if !path.exists() {
            continue;
        }
        found += 1;
        let info = MapInfo::from_pin(&path).map_err(|e| XdpError::Incompatible {
            path: path.display().to_string(),
            what: e.to_string(),
        })?;
        let mismatch = |what: String| XdpError::Incompatible {
            path: path.display().to_string(),
            what,
        };
        let kind = info.map_type().map_err(|e| mismatch(e.to_string()))?;
        if kind != l.kind
            || info.key_size() as usize != l.key
            || info.value_size() as usize != l.value
        {
            return Err(mismatch(format!(
                "type {kind:?} key {} value {}, expected {:?} key {} value {}",
                info.key_size(),
                info.value_size(),
                l.kind,
                l.key,
                l.value
            )));
        }
        match l.size {
            Size::Fixed(n) if n != info.max_entries() => {
                return Err(mismatch(format!(
                    "{} entries, expected {n}",
                    info.max_entries()
                )))
            }
            Size::Configured(f) if f(capacity) != info.max_entries() => warn!(
                map = l.name,
                pinned = info.max_entries(),
                configured = f(capacity),
                "capacity change needs `ewsgate detach`; keeping the pinned size"
            ),
            _ => {}
        }
        match l.name {
            "TBL8_0" => sizes.tbl8_blocks = info.max_entries(),
            "V6TBL_0" => sizes.v6_buckets = info.max_entries(),
            _ => {}
        }
    }
    match found {
        0 => Ok((Start::Fresh, sizes)),
        n if n == layouts.len() => Ok((Start::Adopted, sizes)),
        _ => Err(XdpError::Incompatible {
            path: pins.maps().display().to_string(),
            what: format!("{found} of {} maps pinned", layouts.len()),
        }),
    }
}

/// Removes every pin: unpinning the links detaches the program from the interfaces.
pub fn detach(pin_dir: &Path) -> Result<Vec<String>, XdpError> {
    let pins = Pins::new(pin_dir);
    let mut detached = Vec::new();
    for (iface, (_, path)) in pins.pinned_links() {
        fs::remove_file(&path).map_err(io_err(&path))?;
        detached.push(iface);
    }
    if pins.root().exists() {
        fs::remove_dir_all(pins.root()).map_err(io_err(pins.root()))?;
    }
    let _ = fs::remove_dir(pin_dir); // only if empty
    Ok(detached)
}

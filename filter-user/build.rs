// Builds the XDP program (nightly, bpfel-unknown-none, bpf-linker) and leaves it in OUT_DIR,
// where `xdp.rs` embeds it with include_bytes. `cargo xtask setup` installs the toolchain.
fn main() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../filter-ebpf");
    let package = aya_build::Package {
        name: "filter-ebpf",
        root_dir: root,
        no_default_features: false,
        features: &[],
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::Nightly)
}

// Builds the XDP program (nightly, bpfel-unknown-none, bpf-linker) and leaves it in OUT_DIR,
// where `xdp.rs` embeds it with include_bytes. `cargo xtask setup` installs the toolchain.
//
// Without the `xdp` feature (the fuzz targets build the library that way) no BPF is built:
// an empty object stands in, and loading it fails with `XdpError::NoObject`.
fn main() -> anyhow::Result<()> {
    if std::env::var_os("CARGO_FEATURE_XDP").is_none() {
        let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
        std::fs::write(out.join("ewsgate-xdp"), [])?;
        return Ok(());
    }
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../filter-ebpf");
    let package = aya_build::Package {
        name: "filter-ebpf",
        root_dir: root,
        no_default_features: false,
        features: &[],
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::Nightly)
}

//! Builds `router-ebpf` for the BPF target (nightly + bpf-linker, via aya-build) so that the agent
//! can embed the object. `cargo xtask setup` installs what this needs.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?;
    let root_dir = format!("{manifest_dir}/../router-ebpf");
    let ebpf = aya_build::Package {
        name: "router-ebpf",
        root_dir: &root_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::default()).context(
        "building the eBPF object failed; run `cargo xtask setup` (nightly rust-src, bpf-linker)",
    )
}

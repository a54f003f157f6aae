// Rebuild when the linker changes: a bpf-linker built against another LLVM produces
// objects the kernel may reject, and cargo would not notice on its own.
fn main() {
    if let Ok(path) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}

//! `vmm`: a minimal KVM hypervisor.

fn main() {
    eprintln!("vmm: not implemented yet");
    std::process::exit(1);
}

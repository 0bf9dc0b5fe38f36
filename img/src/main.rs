//! `img`: a qemu-img compatible disk image tool.

fn main() {
    eprintln!("img: not implemented yet");
    std::process::exit(1);
}

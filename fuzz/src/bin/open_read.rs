//! Any bytes opened as each engine format (the first byte picks it, or probing), then info
//! and block status over the whole image with the data read.

fn main() {
    let scratch = fuzz::Scratch::new("open_read");
    afl::fuzz!(|data: &[u8]| {
        let Some((&sel, bytes)) = data.split_first() else {
            return;
        };
        let opts = common::open::OpenOptions {
            read_only: true,
            ..Default::default()
        };
        if let Some(img) = scratch.open(bytes, fuzz::pick_format(sel), opts) {
            fuzz::describe(&img);
            fuzz::walk(img.driver());
        }
    });
}

//! A virtio device's I/O thread: it serves the queues until its stop eventfd fires; stopping
//! (on device reset, or when the handle is dropped) waits for the thread to finish.

use std::thread::JoinHandle;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// A running I/O thread; dropping it stops the thread and waits for it.
pub struct IoThread {
    stop: EventFd,
    handle: Option<JoinHandle<()>>,
}

impl IoThread {
    /// Start `run` on a thread named `name`, with the eventfd that tells it to stop.
    pub fn spawn(name: &str, run: impl FnOnce(EventFd) + Send + 'static) -> Result<Self, String> {
        let stop = EventFd::new(EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"))?;
        let theirs = stop.try_clone().map_err(|e| format!("eventfd: {e}"))?;
        let handle = std::thread::Builder::new()
            .name(name.into())
            .stack_size(common::open::IO_THREAD_STACK)
            .spawn(move || run(theirs))
            .map_err(|e| format!("cannot start I/O thread: {e}"))?;
        Ok(IoThread {
            stop,
            handle: Some(handle),
        })
    }
}

impl Drop for IoThread {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

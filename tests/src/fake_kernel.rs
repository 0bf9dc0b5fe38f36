//! Fake kernels for `vmm`: a minimal bzImage whose "kernel" is a few bytes of 64-bit code,
//! and the code snippets tests put in it.

/// A bzImage (boot protocol 2.15, 64-bit entry) around `code`: one setup sector after the
/// boot sector, then the protected-mode part, whose 64-bit entry point (offset 0x200 of it)
/// is where `code` starts.
pub fn bzimage(code: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; 1024];
    f[0x1f1] = 1; // setup_sects
    f[0x1fe] = 0x55;
    f[0x1ff] = 0xaa;
    f[0x202..0x206].copy_from_slice(b"HdrS");
    f[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    f[0x211] = 1; // LOADED_HIGH
    f[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
    f[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
    f[0x236..0x238].copy_from_slice(&3u16.to_le_bytes()); // XLF_KERNEL_64 | above 4G
    f[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes()); // cmdline_size
    f[0x260..0x264].copy_from_slice(&0x10_0000u32.to_le_bytes()); // init_size
    f.extend(std::iter::repeat_n(0x90u8, 0x200)); // the 32-bit entry: never used
    f.extend_from_slice(code);
    f
}

/// Print the first byte of the kernel command line and a newline on the serial port.
pub const PRINT_CMDLINE_BYTE: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0x8b, 0x86, 0x28, 0x02, 0x00, 0x00, // mov eax, [rsi + 0x228] (cmd_line_ptr)
    0x8a, 0x00, // mov al, [rax]
    0xee, // out dx, al
    0xb0, b'\n', 0xee, // mov al, '\n'; out dx, al
];

/// ACPI S5 (poweroff) through the PM1a control port; halts if that returns.
pub const POWEROFF: &[u8] = &[0x66, 0xba, 0x00, 0x06, 0xb0, 0x34, 0xee, 0xf4, 0xeb, 0xfd];

/// Reset through the i8042 (0xfe to port 0x64).
pub const RESET: &[u8] = &[0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd];

/// `lidt` of a zero-limit table, then `int3`: a triple fault.
pub const CRASH: &[u8] = &[0x0f, 0x01, 0x1c, 0x25, 0x00, 0x30, 0x00, 0x00, 0xcc, 0xf4];

/// Spin forever.
pub const SPIN: &[u8] = &[0xeb, 0xfe];

/// Count `iterations` down to zero in a two-instruction loop (`dec ecx; jnz`), then fall
/// through: guest CPU time proportional to `iterations`.
pub fn count_down(iterations: u32) -> Vec<u8> {
    let mut c = vec![0xb9]; // mov ecx, imm32
    c.extend_from_slice(&iterations.to_le_bytes());
    c.extend_from_slice(&[
        0x85, 0xc9, // test ecx, ecx
        0x74, 0x04, // jz past the loop
        0xff, 0xc9, // dec ecx
        0x75, 0xfc, // jnz dec
    ]);
    c
}

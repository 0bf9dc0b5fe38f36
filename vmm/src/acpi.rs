//! A minimal hardware-reduced ACPI: RSDP, XSDT, FADT (sleep control/status and reset
//! registers in I/O space), MADT (one LAPIC per vCPU and the IOAPIC) and a DSDT holding
//! \_S5 and the PCI root bridge with its resource windows.

use crate::devices::legacy::{ACPI_PM_BASE, ACPI_RESET_VALUE, S5_SLP_TYP};
use crate::devices::pci::{PCI_MMIO_SIZE, PCI_MMIO_START};
use crate::vm::SERIAL_IRQ;

/// Where the tables go (inside the BIOS area, reserved in the E820 map).
pub const ACPI_START: u64 = 0xe_0000;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;

fn checksum(b: &[u8]) -> u8 {
    0u8.wrapping_sub(b.iter().fold(0u8, |a, &x| a.wrapping_add(x)))
}

fn table(sig: &[u8; 4], rev: u8, body: &[u8]) -> Vec<u8> {
    let mut t = Vec::with_capacity(36 + body.len());
    t.extend_from_slice(sig);
    t.extend_from_slice(&((36 + body.len()) as u32).to_le_bytes());
    t.push(rev);
    t.push(0);
    t.extend_from_slice(b"VMMRS ");
    t.extend_from_slice(b"VMMTABLE");
    t.extend_from_slice(&1u32.to_le_bytes());
    t.extend_from_slice(b"VMMR");
    t.extend_from_slice(&1u32.to_le_bytes());
    t.extend_from_slice(body);
    t[9] = checksum(&t);
    t
}

/// Generic address structure for a byte-wide I/O port.
fn gas_io(port: u64) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = 1; // SystemIO
    g[1] = 8; // bit width
    g[3] = 1; // byte access
    g[4..12].copy_from_slice(&port.to_le_bytes());
    g
}

fn pkg_length(payload: usize) -> Vec<u8> {
    if payload + 1 < 0x40 {
        vec![(payload + 1) as u8]
    } else if payload + 2 < 0x1000 {
        let t = payload + 2;
        vec![0x40 | (t & 0xf) as u8, (t >> 4) as u8]
    } else {
        let t = payload + 3;
        vec![0x80 | (t & 0xf) as u8, (t >> 4) as u8, (t >> 12) as u8]
    }
}

fn aml_pkg(op: &[u8], body: &[u8]) -> Vec<u8> {
    let mut v = op.to_vec();
    v.extend(pkg_length(body.len()));
    v.extend_from_slice(body);
    v
}

fn aml_name(name: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut v = vec![0x08];
    v.extend_from_slice(name);
    v.extend_from_slice(data);
    v
}

fn aml_dword(x: u32) -> Vec<u8> {
    let mut v = vec![0x0c];
    v.extend_from_slice(&x.to_le_bytes());
    v
}

fn eisa_id(id: &str) -> u32 {
    let b = id.as_bytes();
    let c = |i: usize| ((b[i] - 0x40) & 0x1f) as u16;
    let vendor = (c(0) << 10) | (c(1) << 5) | c(2);
    let product = u16::from_str_radix(&id[3..7], 16).unwrap();
    let bytes = [
        (vendor >> 8) as u8,
        vendor as u8,
        (product >> 8) as u8,
        product as u8,
    ];
    u32::from_le_bytes(bytes)
}

fn word_addr(ty: u8, type_flags: u8, min: u16, max: u16) -> Vec<u8> {
    let mut v = vec![0x88, 0x0d, 0x00, ty, 0x0c, type_flags];
    for x in [0u16, min, max, 0, max - min + 1] {
        v.extend_from_slice(&x.to_le_bytes());
    }
    v
}

fn dsdt() -> Vec<u8> {
    let mut body = Vec::new();
    // Name(_S5, Package(4){5, 0, 0, 0})
    body.extend(aml_name(
        b"_S5_",
        &aml_pkg(&[0x12], &[4, 0x0a, S5_SLP_TYP, 0, 0, 0]),
    ));
    let mut crs = Vec::new();
    crs.extend(word_addr(2, 0, 0, 0)); // bus 0
    crs.extend([0x47, 0x01, 0xf8, 0x0c, 0xf8, 0x0c, 0x01, 0x08]); // IO 0xcf8..0xcff
    crs.extend(word_addr(1, 3, 0x0000, 0x0cf7));
    crs.extend(word_addr(1, 3, 0x0d00, 0xffff));
    let mut mem = vec![0x87, 0x17, 0x00, 0, 0x0c, 0x01];
    let (min, len) = (PCI_MMIO_START as u32, PCI_MMIO_SIZE as u32);
    for x in [0u32, min, min + (len - 1), 0, len] {
        mem.extend_from_slice(&x.to_le_bytes());
    }
    crs.extend(mem);
    crs.extend([0x79, 0x00]);
    let mut buf = vec![0x0b];
    buf.extend_from_slice(&(crs.len() as u16).to_le_bytes());
    buf.extend(crs);
    let mut dev = Vec::new();
    dev.extend(b"PCI0");
    dev.extend(aml_name(b"_HID", &aml_dword(eisa_id("PNP0A03"))));
    dev.extend(aml_name(b"_ADR", &[0x00]));
    dev.extend(aml_name(b"_SEG", &[0x00]));
    dev.extend(aml_name(b"_UID", &[0x00]));
    dev.extend(aml_name(b"_BBN", &[0x00]));
    dev.extend(aml_name(b"_CRS", &aml_pkg(&[0x11], &buf)));
    // COM1, so that Linux maps its GSI (there is no legacy PIC in hardware-reduced mode,
    // so ISA IRQs exist only when ACPI declares them).
    let mut com1 = Vec::new();
    com1.extend(b"COM1");
    com1.extend(aml_name(b"_HID", &aml_dword(eisa_id("PNP0501"))));
    com1.extend(aml_name(b"_UID", &[0x01]));
    let mut com_crs = vec![0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x08, 0x08]; // IO 0x3f8, 8 ports
    com_crs.extend([0x22, 1 << SERIAL_IRQ, 0x00]); // IRQNoFlags {4}
    com_crs.extend([0x79, 0x00]);
    let mut com_buf = vec![0x0a, com_crs.len() as u8];
    com_buf.extend(com_crs);
    com1.extend(aml_name(b"_CRS", &aml_pkg(&[0x11], &com_buf)));
    let mut scope = b"\\_SB_".to_vec();
    scope.extend(aml_pkg(&[0x5b, 0x82], &dev));
    scope.extend(aml_pkg(&[0x5b, 0x82], &com1));
    body.extend(aml_pkg(&[0x10], &scope));
    table(b"DSDT", 2, &body)
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut b = vec![0u8; 276 - 36];
    let mut put = |off: usize, v: &[u8]| b[off - 36..off - 36 + v.len()].copy_from_slice(v);
    put(40, &(dsdt_addr as u32).to_le_bytes());
    // IAPC_BOOT_ARCH: VGA not present, CMOS RTC not present.
    put(109, &((1u16 << 2) | (1 << 5)).to_le_bytes());
    // Flags: WBINVD, PWR_BUTTON, SLP_BUTTON, RESET_REG_SUP, HW_REDUCED_ACPI.
    let flags: u32 = 1 | (1 << 4) | (1 << 5) | (1 << 10) | (1 << 20);
    put(112, &flags.to_le_bytes());
    put(116, &gas_io(ACPI_PM_BASE + 2));
    put(128, &[ACPI_RESET_VALUE]);
    put(131, &[0]); // minor version
    put(140, &dsdt_addr.to_le_bytes());
    put(244, &gas_io(ACPI_PM_BASE));
    put(256, &gas_io(ACPI_PM_BASE + 1));
    put(268, b"VMMRSVMM");
    table(b"FACP", 6, &b)
}

fn madt(cpus: u8) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    for i in 0..cpus {
        b.extend_from_slice(&[0, 8, i, i, 1, 0, 0, 0]);
    }
    b.extend_from_slice(&[1, 12, 0, 0]);
    b.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    // LINT1 of every processor is NMI.
    b.extend_from_slice(&[4, 6, 0xff, 0, 0, 1]);
    table(b"APIC", 5, &b)
}

/// Build all tables for placement at [`ACPI_START`]; returns the bytes (RSDP first).
pub fn build(cpus: u8) -> Vec<u8> {
    let align = |v: &mut Vec<u8>| v.resize(v.len().next_multiple_of(64), 0);
    let mut out = vec![0u8; 64]; // RSDP, filled in below
    let xsdt_off = out.len();
    out.extend(vec![0u8; 36 + 16]);
    align(&mut out);
    let dsdt_off = out.len();
    out.extend(dsdt());
    align(&mut out);
    let fadt_off = out.len();
    out.extend(fadt(ACPI_START + dsdt_off as u64));
    align(&mut out);
    let madt_off = out.len();
    out.extend(madt(cpus));
    let mut ptrs = Vec::new();
    ptrs.extend_from_slice(&(ACPI_START + fadt_off as u64).to_le_bytes());
    ptrs.extend_from_slice(&(ACPI_START + madt_off as u64).to_le_bytes());
    let xsdt = table(b"XSDT", 1, &ptrs);
    out[xsdt_off..xsdt_off + xsdt.len()].copy_from_slice(&xsdt);

    let mut rsdp = Vec::new();
    rsdp.extend_from_slice(b"RSD PTR ");
    rsdp.push(0);
    rsdp.extend_from_slice(b"VMMRS ");
    rsdp.push(2);
    rsdp.extend_from_slice(&0u32.to_le_bytes());
    rsdp.extend_from_slice(&36u32.to_le_bytes());
    rsdp.extend_from_slice(&(ACPI_START + xsdt_off as u64).to_le_bytes());
    rsdp.extend_from_slice(&[0, 0, 0, 0]);
    rsdp[8] = checksum(&rsdp[..20]);
    rsdp[32] = checksum(&rsdp);
    out[..36].copy_from_slice(&rsdp);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_layout() {
        let t = build(4);
        assert_eq!(&t[..8], b"RSD PTR ");
        assert_eq!(t[..20].iter().fold(0u8, |a, &x| a.wrapping_add(x)), 0);
        assert_eq!(t[..36].iter().fold(0u8, |a, &x| a.wrapping_add(x)), 0);
        let xsdt = u64::from_le_bytes(t[24..32].try_into().unwrap()) - ACPI_START;
        let x = &t[xsdt as usize..];
        assert_eq!(&x[..4], b"XSDT");
        let len = u32::from_le_bytes(x[4..8].try_into().unwrap()) as usize;
        assert_eq!(x[..len].iter().fold(0u8, |a, &b| a.wrapping_add(b)), 0);
        for i in 0..(len - 36) / 8 {
            let p = u64::from_le_bytes(x[36 + 8 * i..44 + 8 * i].try_into().unwrap()) - ACPI_START;
            let tb = &t[p as usize..];
            let l = u32::from_le_bytes(tb[4..8].try_into().unwrap()) as usize;
            assert_eq!(tb[..l].iter().fold(0u8, |a, &b| a.wrapping_add(b)), 0);
        }
        assert_eq!(eisa_id("PNP0A03"), 0x030a_d041);
        assert_eq!(pkg_length(10), vec![11]);
        assert_eq!(pkg_length(100), vec![0x40 | (102 & 0xf), 102 >> 4]);
    }

    /// When ACPICA's disassembler is installed, check that it accepts every table.
    #[test]
    fn iasl_accepts_tables() {
        if std::process::Command::new("iasl")
            .arg("-v")
            .output()
            .is_err()
        {
            // CI installs acpica-tools (fixtures/install-host-deps.sh): never skip there.
            assert!(std::env::var_os("CI").is_none(), "iasl is missing in CI");
            eprintln!("SKIPPED: iasl not installed (apt-get install acpica-tools)");
            return;
        }
        let dir = std::env::temp_dir().join(format!("vmm-acpi-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let t = build(2);
        let mut found = Vec::new();
        let mut off = 64;
        while off + 8 <= t.len() {
            let sig = &t[off..off + 4];
            if sig.iter().all(|c| c.is_ascii_uppercase()) {
                let len = u32::from_le_bytes(t[off + 4..off + 8].try_into().unwrap()) as usize;
                let name = String::from_utf8_lossy(sig).to_string();
                let f = dir.join(format!("{name}.dat"));
                std::fs::write(&f, &t[off..off + len]).unwrap();
                let out = std::process::Command::new("iasl")
                    .arg("-d")
                    .arg(&f)
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "{name}: {}",
                    String::from_utf8_lossy(&out.stdout)
                );
                let dsl = std::fs::read_to_string(dir.join(format!("{name}.dsl"))).unwrap();
                if name == "DSDT" {
                    assert!(
                        dsl.contains("PNP0A03") && dsl.contains("PNP0501") && dsl.contains("_S5_"),
                        "{dsl}"
                    );
                }
                found.push(name);
                off = (off + len).next_multiple_of(64);
            } else {
                off += 64;
            }
        }
        assert_eq!(found, ["XSDT", "DSDT", "FACP", "APIC"]);
        if std::env::var_os("VMM_KEEP_ACPI").is_none() {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

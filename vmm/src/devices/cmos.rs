//! The MC146818 CMOS RTC on ports 0x70 (index, bit 7 masks NMI) and 0x71 (data): the clock
//! reads the host's time (UTC), the update-in-progress flag never shows, and no RTC
//! interrupt is raised. The NVRAM holds what PC firmware reads there: base, extended and
//! high memory sizes, the CPU count and the boot device (in QEMU's layout, which SeaBIOS
//! reads).

use crate::bus::BusDevice;

pub const CMOS_PORT: u64 = 0x70;
pub const CMOS_LEN: u64 = 2;

const REG_SECONDS: usize = 0x00;
const REG_MINUTES: usize = 0x02;
const REG_HOURS: usize = 0x04;
const REG_WEEKDAY: usize = 0x06;
const REG_DAY: usize = 0x07;
const REG_MONTH: usize = 0x08;
const REG_YEAR: usize = 0x09;
const REG_A: usize = 0x0a;
const REG_B: usize = 0x0b;
const REG_C: usize = 0x0c;
const REG_D: usize = 0x0d;
const REG_CENTURY: usize = 0x32;
/// Register B: 24-hour mode.
const B_24H: u8 = 0x02;
/// Register B: binary (not BCD) values.
const B_BINARY: u8 = 0x04;

/// NVRAM fields (QEMU's pc layout).
pub const BASE_MEM_LOW: usize = 0x15;
pub const EXT_MEM_LOW: usize = 0x17;
pub const EXT_MEM2_LOW: usize = 0x30;
pub const MEM_ABOVE_16M_LOW: usize = 0x34;
pub const BOOT_DEVICE: usize = 0x3d;
pub const MEM_ABOVE_4G: usize = 0x5b;
pub const SMP_COUNT: usize = 0x5f;

/// What the NVRAM describes.
#[derive(Debug, Clone, Copy)]
pub struct CmosLayout {
    /// RAM below 4 GiB, in bytes (from address 0).
    pub mem_below_4g: u64,
    /// RAM from 4 GiB up, in bytes.
    pub mem_above_4g: u64,
    pub cpus: u8,
}

/// The RTC and its 128 bytes of NVRAM.
pub struct Cmos {
    index: u8,
    regs: [u8; 128],
    /// Seconds since the Unix epoch, UTC.
    clock: Box<dyn Fn() -> u64 + Send>,
}

fn host_time() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// (year, month 1-12, day 1-31) of day `z` counted from 1970-01-01 (Howard Hinnant's
/// civil-from-days).
fn civil_date(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

impl Cmos {
    /// The RTC reading the host clock.
    pub fn new(layout: CmosLayout) -> Self {
        Self::with_clock(layout, Box::new(host_time))
    }

    /// The RTC reading `clock` (seconds since the epoch).
    pub fn with_clock(layout: CmosLayout, clock: Box<dyn Fn() -> u64 + Send>) -> Self {
        let mut regs = [0u8; 128];
        regs[REG_A] = 0x26; // 32.768 kHz time base, 1024 Hz periodic rate
        regs[REG_B] = B_24H;
        regs[REG_D] = 0x80; // RAM and time valid (battery good)
        let put16 = |r: &mut [u8; 128], at: usize, v: u64| {
            let v = v.min(0xffff) as u16;
            r[at..at + 2].copy_from_slice(&v.to_le_bytes());
        };
        put16(&mut regs, BASE_MEM_LOW, 640);
        // KiB from 1 MiB up (at most 0xffff), in both places firmware looks.
        let ext_kib = layout.mem_below_4g.saturating_sub(1 << 20) >> 10;
        put16(&mut regs, EXT_MEM_LOW, ext_kib);
        put16(&mut regs, EXT_MEM2_LOW, ext_kib);
        // 64 KiB units from 16 MiB up.
        put16(
            &mut regs,
            MEM_ABOVE_16M_LOW,
            layout.mem_below_4g.saturating_sub(16 << 20) >> 16,
        );
        let high = (layout.mem_above_4g >> 16).min(0xff_ffff) as u32;
        regs[MEM_ABOVE_4G..MEM_ABOVE_4G + 3].copy_from_slice(&high.to_le_bytes()[..3]);
        regs[SMP_COUNT] = layout.cpus.saturating_sub(1);
        regs[BOOT_DEVICE] = 0x02; // first boot device: hard disk
        Cmos {
            index: 0,
            regs,
            clock,
        }
    }

    /// `v` (0-99) in the mode register B selects.
    fn encode(&self, v: u32) -> u8 {
        if self.regs[REG_B] & B_BINARY != 0 {
            v as u8
        } else {
            ((v / 10) << 4 | (v % 10)) as u8
        }
    }

    fn time_register(&self, reg: usize) -> u8 {
        let now = (self.clock)();
        let secs = now % 86_400;
        let days = (now / 86_400) as i64;
        let (year, month, day) = civil_date(days);
        match reg {
            REG_SECONDS => self.encode((secs % 60) as u32),
            REG_MINUTES => self.encode((secs / 60 % 60) as u32),
            REG_HOURS => {
                let h = (secs / 3600) as u32;
                if self.regs[REG_B] & B_24H != 0 {
                    self.encode(h)
                } else {
                    let h12 = if h.is_multiple_of(12) { 12 } else { h % 12 };
                    self.encode(h12) | if h >= 12 { 0x80 } else { 0 }
                }
            }
            // 1970-01-01 was a Thursday; Sunday is 1.
            REG_WEEKDAY => self.encode(((days + 4).rem_euclid(7) + 1) as u32),
            REG_DAY => self.encode(day),
            REG_MONTH => self.encode(month),
            REG_YEAR => self.encode(year.rem_euclid(100) as u32),
            _ => self.encode(year.div_euclid(100).clamp(0, 99) as u32),
        }
    }

    fn read_reg(&mut self, reg: usize) -> u8 {
        match reg {
            REG_SECONDS | REG_MINUTES | REG_HOURS | REG_WEEKDAY | REG_DAY | REG_MONTH
            | REG_YEAR | REG_CENTURY => self.time_register(reg),
            // No interrupt flags ever set; reading clears them.
            REG_C => 0,
            _ => self.regs[reg],
        }
    }

    fn write_reg(&mut self, reg: usize, v: u8) {
        match reg {
            // The clock follows the host; register A's UIP, C and D are read-only.
            REG_SECONDS | REG_MINUTES | REG_HOURS | REG_WEEKDAY | REG_DAY | REG_MONTH
            | REG_YEAR | REG_CENTURY | REG_C | REG_D => {}
            REG_A => self.regs[REG_A] = v & 0x7f,
            _ => self.regs[reg] = v,
        }
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if offset == 1 && data.len() == 1 {
            data[0] = self.read_reg((self.index & 0x7f) as usize);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let [v] = *data else { return };
        match offset {
            0 => self.index = v,
            _ => self.write_reg((self.index & 0x7f) as usize, v),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(c: &mut Cmos, reg: u8) -> u8 {
        c.write(0, &[reg | 0x80]);
        let mut b = [0u8];
        c.read(1, &mut b);
        b[0]
    }

    fn layout(below: u64, above: u64, cpus: u8) -> CmosLayout {
        CmosLayout {
            mem_below_4g: below,
            mem_above_4g: above,
            cpus,
        }
    }

    #[test]
    fn memory_sizes_and_cpus() {
        let mut c = Cmos::new(layout(3 << 30, 5 << 30, 4));
        let r16 = |c: &mut Cmos, at: usize| {
            u16::from_le_bytes([read(c, at as u8), read(c, at as u8 + 1)])
        };
        assert_eq!(r16(&mut c, BASE_MEM_LOW), 640);
        // More than 64 MiB: the KiB fields saturate, the 64 KiB field carries the size.
        assert_eq!(r16(&mut c, EXT_MEM_LOW), 0xffff);
        assert_eq!(r16(&mut c, EXT_MEM2_LOW), 0xffff);
        assert_eq!(
            r16(&mut c, MEM_ABOVE_16M_LOW) as u64,
            ((3 << 30) - (16 << 20)) >> 16
        );
        let high = (0..3).fold(0u64, |a, i| {
            a | (read(&mut c, MEM_ABOVE_4G as u8 + i) as u64) << (8 * i)
        });
        assert_eq!(high << 16, 5 << 30);
        assert_eq!(read(&mut c, SMP_COUNT as u8), 3);
        assert_eq!(read(&mut c, BOOT_DEVICE as u8), 2);

        // SeaBIOS's fallback when fw_cfg has no e820: RAM = (0x34 field << 16) + 16 MiB.
        let mut small = Cmos::new(layout(48 << 20, 0, 1));
        let rs = (r16(&mut small, MEM_ABOVE_16M_LOW) as u64) << 16;
        assert_eq!(rs + (16 << 20), 48 << 20);
        assert_eq!(r16(&mut small, EXT_MEM_LOW), 47 * 1024);
        assert_eq!(read(&mut small, SMP_COUNT as u8), 0);
    }

    #[test]
    fn clock_in_bcd_and_binary() {
        // 2026-12-02 00:41:07 UTC, a Wednesday.
        let t = 1_796_172_067;
        let mut c = Cmos::with_clock(layout(64 << 20, 0, 1), Box::new(move || t));
        assert_eq!(read(&mut c, 0x00), 0x07);
        assert_eq!(read(&mut c, 0x02), 0x41);
        assert_eq!(read(&mut c, 0x04), 0x00);
        assert_eq!(read(&mut c, 0x06), 0x04);
        assert_eq!(read(&mut c, 0x07), 0x02);
        assert_eq!(read(&mut c, 0x08), 0x12);
        assert_eq!(read(&mut c, 0x09), 0x26);
        assert_eq!(read(&mut c, 0x32), 0x20);
        // Status A never shows an update in progress; D says the battery is fine.
        assert_eq!(read(&mut c, 0x0a) & 0x80, 0);
        assert_eq!(read(&mut c, 0x0d), 0x80);
        // Binary, 12-hour mode: midnight is 12 AM.
        c.write(0, &[0x0b]);
        c.write(1, &[B_BINARY]);
        assert_eq!(read(&mut c, 0x04), 12);
        assert_eq!(read(&mut c, 0x02), 41);
        assert_eq!(read(&mut c, 0x09), 26);
        // Writes to the time registers leave the clock alone; NVRAM bytes keep writes.
        c.write(0, &[0x00]);
        c.write(1, &[0x59]);
        assert_eq!(read(&mut c, 0x00), 7);
        c.write(0, &[0x40]);
        c.write(1, &[0xa5]);
        assert_eq!(read(&mut c, 0x40), 0xa5);
    }

    #[test]
    fn dates() {
        assert_eq!(civil_date(0), (1970, 1, 1));
        assert_eq!(civil_date(11_016), (2000, 2, 29));
        assert_eq!(civil_date(-1), (1969, 12, 31));
    }
}

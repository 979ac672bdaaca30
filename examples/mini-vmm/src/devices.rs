//! The mini-vmm's devices: a 16550 serial port (vm-superio) on COM1, the i8042 keyboard
//! controller's reset line (how a Linux guest started with `reboot=k` ends the VM), and the
//! small test-device ports the bundled guests use (exit status, parameter, data).
//!
//! The bundled guests poll the serial port, so its interrupt goes nowhere ([`SerialIrq::None`]).
//! A Linux guest drives the port with interrupts: there the line is an eventfd registered as
//! a KVM irqfd for GSI 4 ([`SerialIrq::Waking`]), so raising it costs a `write(2)` and no
//! extra exit; KVM's in-kernel PIC/IOAPIC deliver it. It also wakes vCPUs parked on the
//! scheduler ([`crate::sched::IrqWake`]). [`SerialIrq::EventFd`] is the bare irqfd.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;
use vm_superio::serial::SerialState;
use vm_superio::{Serial, Trigger};

use vmm_sys_util::eventfd::EventFd;

/// The serial port's interrupt line.
#[derive(Debug)]
pub enum SerialIrq {
    /// Not connected (polling guests).
    None,
    /// An eventfd, registered by the VMM as an irqfd: each trigger is one edge on its GSI.
    EventFd(EventFd),
    /// An irqfd that also wakes vCPUs parked on the scheduler (see [`crate::sched::IrqWake`]).
    Waking(crate::sched::WakingIrqFd),
}

impl Trigger for SerialIrq {
    type E = std::io::Error;
    fn trigger(&self) -> Result<(), Self::E> {
        match self {
            SerialIrq::None => Ok(()),
            SerialIrq::EventFd(fd) => fd.write(1),
            SerialIrq::Waking(irq) => vmkit_virtio::interrupt::IrqTrigger::trigger(irq),
        }
    }
}

/// COM1: vm-superio's 16550 model writing to `W`.
pub struct SerialPort<W: Write> {
    serial: Serial<SerialIrq, vm_superio::serial::NoEvents, W>,
}

impl<W: Write> SerialPort<W> {
    /// A serial port writing guest output to `out`, without an interrupt line.
    pub fn new(out: W) -> Self {
        Self::with_irq(out, SerialIrq::None)
    }

    /// A serial port writing guest output to `out` and raising `irq`.
    pub fn with_irq(out: W, irq: SerialIrq) -> Self {
        SerialPort {
            serial: Serial::new(irq, out),
        }
    }

    /// The output sink.
    pub fn writer(&self) -> &W {
        self.serial.writer()
    }

    /// Queues host input in the receive FIFO, raising the receive interrupt if the driver
    /// enabled it. Returns how many bytes fit (0 when the FIFO is full: retry later).
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.serial.fifo_capacity().min(bytes.len());
        // Only the interrupt can fail once there is room, and the bytes are queued by then.
        match self.serial.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(_) => room,
        }
    }

    /// The port's registers and receive FIFO, for a snapshot.
    pub fn state(&self) -> SerialState {
        self.serial.state()
    }

    /// A port continuing from `state`, writing to `out` and raising `irq`. Fails if the saved
    /// FIFO holds more than the 16550's 64 bytes.
    pub fn from_state(state: &SerialState, out: W, irq: SerialIrq) -> Result<Self, String> {
        Serial::from_state(state, irq, vm_superio::serial::NoEvents, out)
            .map(|serial| SerialPort { serial })
            .map_err(|e| format!("{e:?}"))
    }
}

impl<W: Write> MutDevicePio for SerialPort<W> {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        if let (Some(first), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.serial.read(off);
        }
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if let (Some(&b), Ok(off)) = (data.first(), u8::try_from(offset)) {
            // Output errors (a closed stdout) must not stop the guest.
            let _ = self.serial.write(off, b);
        }
    }
}

/// Port 0xf4: the guest's exit status.
#[derive(Debug, Default)]
pub struct ExitPort {
    status: AtomicU64,
}

impl ExitPort {
    const UNSET: u64 = u64::MAX;

    /// A port with no status yet.
    pub fn new() -> Self {
        ExitPort {
            status: AtomicU64::new(Self::UNSET),
        }
    }

    /// The status the guest reported, if any.
    pub fn status(&self) -> Option<u32> {
        let v = self.status.load(Ordering::SeqCst);
        (v != Self::UNSET).then_some(v as u32)
    }

    /// Sets (or clears) the reported status, when restoring a snapshot.
    pub fn set_status(&self, status: Option<u32>) {
        let v = status.map_or(Self::UNSET, u64::from);
        self.status.store(v, Ordering::SeqCst);
    }
}

impl vm_device::DevicePio for ExitPort {
    fn pio_read(&self, _base: PioAddress, _offset: PioAddressOffset, data: &mut [u8]) {
        data.fill(0);
    }

    fn pio_write(&self, _base: PioAddress, _offset: PioAddressOffset, data: &[u8]) {
        let mut v = [0u8; 4];
        for (d, s) in v.iter_mut().zip(data) {
            *d = *s;
        }
        self.status
            .store(u64::from(u32::from_le_bytes(v)), Ordering::SeqCst);
    }
}

/// Ports 0x510 (parameter, read) and 0x511 (data, written values are recorded).
#[derive(Debug, Default)]
pub struct TestPorts {
    /// Value returned on 0x510.
    pub param: AtomicU32,
    /// Values written to 0x511: the first [`TestPorts::MAX_RECORDED`]` - 1` and the latest
    /// (a guest writing in a loop must not grow host memory without bound).
    pub data: Mutex<Vec<u32>>,
    /// Where every value written to 0x511 also goes, one decimal number a line
    /// (`--data-log`).
    pub log: Mutex<Option<BufWriter<File>>>,
}

impl TestPorts {
    /// How many values [`TestPorts::data`] holds at most.
    pub const MAX_RECORDED: usize = 4096;

    /// Writes buffered [`TestPorts::log`] lines to their file.
    pub fn flush_log(&self) -> std::io::Result<()> {
        match self.log.lock() {
            Ok(mut log) => log.as_mut().map_or(Ok(()), |w| w.flush()),
            Err(_) => Err(std::io::Error::other("data log lock poisoned")),
        }
    }
}

impl vm_device::DevicePio for TestPorts {
    fn pio_read(&self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        let v = if offset == 0 {
            self.param.load(Ordering::SeqCst)
        } else {
            0
        };
        for (d, s) in data.iter_mut().zip(v.to_le_bytes().iter().cycle()) {
            *d = *s;
        }
    }

    fn pio_write(&self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if offset == 1 {
            let mut v = [0u8; 4];
            for (d, s) in v.iter_mut().zip(data) {
                *d = *s;
            }
            let v = u32::from_le_bytes(v);
            if let Ok(mut log) = self.log.lock() {
                if let Some(w) = log.as_mut() {
                    // A full disk must not stop the guest; the line is lost.
                    let _ = writeln!(w, "{v}");
                }
            }
            if let Ok(mut log) = self.data.lock() {
                if log.len() < Self::MAX_RECORDED {
                    log.push(v);
                } else if let Some(last) = log.last_mut() {
                    *last = v;
                }
            }
        }
    }
}

/// The i8042 keyboard controller of a PC without keyboard or mouse: enough of its command set
/// for Linux's probe (read/write the configuration byte, self tests) and the CPU reset line.
///
/// Ports: data at 0x60, status (read) / command (write) at 0x64. Command 0xFE pulses the reset
/// line, which is what Linux's `reboot=k` does; the VMM watches [`I8042::reset_requested`] and
/// ends the VM. Keyboard and mouse commands get no answer, as with nothing plugged in.
#[derive(Debug)]
pub struct I8042 {
    /// Controller configuration byte (command 0x20 reads it, 0x60 writes it).
    config: u8,
    /// Byte waiting in the output buffer.
    output: Option<u8>,
    /// The next data-port write is the argument of this command.
    pending: Option<u8>,
    reset: Arc<AtomicBool>,
}

/// What [`I8042::state`] saves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct I8042State {
    /// Configuration byte.
    pub config: u8,
    /// Byte in the output buffer.
    pub output: Option<u8>,
    /// Command waiting for its data byte.
    pub pending: Option<u8>,
    /// The reset line was pulsed.
    pub reset: bool,
}

impl Default for I8042 {
    fn default() -> Self {
        Self::new()
    }
}

impl I8042 {
    /// Data port.
    pub const DATA_PORT: u16 = 0x60;
    /// Status/command port.
    pub const COMMAND_PORT: u16 = 0x64;

    const STATUS_OUTPUT_FULL: u8 = 1;
    const STATUS_SYSTEM: u8 = 1 << 2;
    const STATUS_COMMAND: u8 = 1 << 3;
    /// Set when the keyboard is not inhibited (no key lock).
    const STATUS_UNLOCKED: u8 = 1 << 4;
    const CMD_READ_CONFIG: u8 = 0x20;
    const CMD_WRITE_CONFIG: u8 = 0x60;
    const CMD_DISABLE_AUX: u8 = 0xa7;
    const CMD_ENABLE_AUX: u8 = 0xa8;
    const CMD_TEST_AUX: u8 = 0xa9;
    const CMD_SELF_TEST: u8 = 0xaa;
    const CMD_TEST_KBD: u8 = 0xab;
    const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
    const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
    const CMD_PULSE_RESET: u8 = 0xfe;

    /// A controller after power-on: keyboard interrupt enabled, mouse port disabled.
    pub fn new() -> Self {
        I8042 {
            config: 0x61,
            output: None,
            pending: None,
            reset: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Shared flag that becomes true when the guest pulses the reset line.
    pub fn reset_requested(&self) -> Arc<AtomicBool> {
        self.reset.clone()
    }

    /// The controller's state, for a snapshot.
    pub fn state(&self) -> I8042State {
        I8042State {
            config: self.config,
            output: self.output,
            pending: self.pending,
            reset: self.reset.load(Ordering::SeqCst),
        }
    }

    /// Puts the controller in `state` (keeping its reset flag's identity, which the VMM
    /// watches).
    pub fn set_state(&mut self, state: &I8042State) {
        self.config = state.config;
        self.output = state.output;
        self.pending = state.pending;
        self.reset.store(state.reset, Ordering::SeqCst);
    }

    fn status(&self) -> u8 {
        let mut s = Self::STATUS_SYSTEM | Self::STATUS_UNLOCKED;
        if self.output.is_some() {
            s |= Self::STATUS_OUTPUT_FULL;
        }
        if self.pending.is_some() {
            s |= Self::STATUS_COMMAND;
        }
        s
    }

    fn command(&mut self, cmd: u8) {
        match cmd {
            Self::CMD_READ_CONFIG => self.output = Some(self.config),
            Self::CMD_WRITE_CONFIG | Self::CMD_WRITE_OUTPUT_PORT => self.pending = Some(cmd),
            Self::CMD_SELF_TEST => self.output = Some(0x55),
            Self::CMD_TEST_KBD | Self::CMD_TEST_AUX => self.output = Some(0x00),
            // Bit 0: the CPU is not held in reset; bit 1: A20 enabled.
            Self::CMD_READ_OUTPUT_PORT => self.output = Some(0x03),
            Self::CMD_DISABLE_AUX => self.config |= 0x20,
            Self::CMD_ENABLE_AUX => self.config &= !0x20,
            Self::CMD_PULSE_RESET => self.reset.store(true, Ordering::SeqCst),
            _ => {}
        }
    }

    fn data_write(&mut self, value: u8) {
        match self.pending.take() {
            Some(Self::CMD_WRITE_CONFIG) => self.config = value,
            // Output port bit 0 low holds the CPU in reset.
            Some(Self::CMD_WRITE_OUTPUT_PORT) if value & 1 == 0 => {
                self.reset.store(true, Ordering::SeqCst)
            }
            // Bytes for the keyboard: nothing is plugged in, nothing answers.
            _ => {}
        }
    }
}

impl MutDevicePio for I8042 {
    fn pio_read(&mut self, base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        let value = match base.0.checked_add(offset) {
            Some(Self::DATA_PORT) => self.output.take().unwrap_or(0),
            Some(Self::COMMAND_PORT) => self.status(),
            _ => 0xff,
        };
        data.fill(value);
    }

    fn pio_write(&mut self, base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match base.0.checked_add(offset) {
            Some(Self::DATA_PORT) => self.data_write(value),
            Some(Self::COMMAND_PORT) => self.command(value),
            _ => {}
        }
    }
}

/// The CMOS RTC/NVRAM of a PC (MC146818): index at 0x70, data at 0x71.
///
/// Without it Linux's `rtc_cmos` reads all ones from the unclaimed ports, sees "update in
/// progress" forever and spends seconds in timeouts before giving up. The clock registers
/// report the host's UTC time (BCD, 24-hour), computed at each read, so the guest's wall
/// clock starts right; guest writes to them are ignored. No interrupts (IRQ 8) are raised.
#[derive(Debug)]
pub struct Cmos {
    index: u8,
    nvram: [u8; 128],
}

impl Default for Cmos {
    fn default() -> Self {
        Self::new()
    }
}

impl Cmos {
    /// Index port.
    pub const INDEX_PORT: u16 = 0x70;
    /// Data port.
    pub const DATA_PORT: u16 = 0x71;

    const REG_A: usize = 0x0a;
    const REG_B: usize = 0x0b;
    const REG_C: usize = 0x0c;
    const REG_D: usize = 0x0d;
    const REG_CENTURY: usize = 0x32;

    /// An RTC in BCD, 24-hour mode, with valid RAM and time.
    pub fn new() -> Self {
        let mut nvram = [0u8; 128];
        // 32.768 kHz time base, 1024 Hz periodic rate; update-in-progress clear.
        nvram[Self::REG_A] = 0x26;
        nvram[Self::REG_B] = 0x02;
        // Valid RAM and time.
        nvram[Self::REG_D] = 0x80;
        Cmos { index: 0, nvram }
    }

    /// The index register and the 128 bytes of NVRAM, for a snapshot (the clock registers
    /// follow the host clock and need no saving).
    pub fn state(&self) -> (u8, [u8; 128]) {
        (self.index, self.nvram)
    }

    /// Puts the RTC in a saved state (the index is masked to 7 bits as a guest write is).
    pub fn set_state(&mut self, index: u8, nvram: [u8; 128]) {
        self.index = index & 0x7f;
        self.nvram = nvram;
    }

    fn read(&self, index: usize) -> u8 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let t = rtc_time(now);
        match index {
            0x00 => t.second,
            0x02 => t.minute,
            0x04 => t.hour,
            0x06 => t.weekday,
            0x07 => t.day,
            0x08 => t.month,
            0x09 => t.year,
            Self::REG_CENTURY => t.century,
            // Reading register C acknowledges interrupts: none are ever pending.
            Self::REG_C => 0,
            _ => self.nvram.get(index).copied().unwrap_or(0xff),
        }
    }

    fn write(&mut self, index: usize, value: u8) {
        match index {
            // Time and the read-only status registers follow the host clock.
            0x00..=0x09 | Self::REG_C | Self::REG_D | Self::REG_CENTURY => {}
            // Keep the update-in-progress bit clear.
            Self::REG_A => self.nvram[Self::REG_A] = value & 0x7f,
            _ => {
                if let Some(b) = self.nvram.get_mut(index) {
                    *b = value;
                }
            }
        }
    }
}

impl MutDevicePio for Cmos {
    fn pio_read(&mut self, base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        let value = match base.0.checked_add(offset) {
            Some(Self::INDEX_PORT) => self.index,
            Some(Self::DATA_PORT) => self.read(usize::from(self.index)),
            _ => 0xff,
        };
        data.fill(value);
    }

    fn pio_write(&mut self, base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match base.0.checked_add(offset) {
            // Bit 7 of the index masks NMIs on real hardware; only the low 7 bits select.
            Some(Self::INDEX_PORT) => self.index = value & 0x7f,
            Some(Self::DATA_PORT) => self.write(usize::from(self.index), value),
            _ => {}
        }
    }
}

/// The RTC's clock registers, in BCD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtcTime {
    /// Seconds, 0x00-0x59.
    pub second: u8,
    /// Minutes.
    pub minute: u8,
    /// Hours, 24-hour.
    pub hour: u8,
    /// Day of the week, 1 = Sunday.
    pub weekday: u8,
    /// Day of the month, from 1.
    pub day: u8,
    /// Month, from 1.
    pub month: u8,
    /// Year within the century.
    pub year: u8,
    /// Century.
    pub century: u8,
}

fn bcd(v: u64) -> u8 {
    let v = (v % 100) as u8;
    ((v / 10) << 4) | (v % 10)
}

/// The RTC registers for `secs` seconds after the Unix epoch (UTC).
pub fn rtc_time(secs: u64) -> RtcTime {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil date from a day count (the proleptic Gregorian era algorithm), with days
    // shifted so eras start on 0000-03-01.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    RtcTime {
        second: bcd(rem % 60),
        minute: bcd(rem / 60 % 60),
        hour: bcd(rem / 3600),
        // 1970-01-01 was a Thursday (5 with Sunday = 1).
        weekday: bcd((days + 4) % 7 + 1),
        day: bcd(day),
        month: bcd(month),
        year: bcd(year % 100),
        century: bcd(year / 100),
    }
}

/// The FADT sleep control and status registers of a hardware-reduced ACPI platform: how
/// Linux powers the machine off (`poweroff` -> `acpi_enter_sleep_state(S5)`).
///
/// Linux writes `SLP_TYP << 2 | SLP_EN` to the control register, with `SLP_TYP` taken from the
/// DSDT's `\_S5_` package ([`crate::acpi::S5_SLEEP_TYPE`]); the VMM watches
/// [`AcpiSleep::power_off_requested`] and ends the VM. Other sleep states are not offered (no
/// `\_S3_`), so other writes are ignored. The status register reads 0 (never woken).
#[derive(Debug, Default)]
pub struct AcpiSleep {
    off: Arc<AtomicBool>,
}

impl AcpiSleep {
    /// `SLP_EN`: bit 5 of the sleep control register.
    const SLP_EN: u8 = 1 << 5;

    /// Shared flag that becomes true when the guest enters S5.
    pub fn power_off_requested(&self) -> Arc<AtomicBool> {
        self.off.clone()
    }

    /// Sets the S5 flag, when restoring a snapshot.
    pub fn set_power_off(&self, off: bool) {
        self.off.store(off, Ordering::SeqCst);
    }
}

impl vm_device::DevicePio for AcpiSleep {
    fn pio_read(&self, _base: PioAddress, _offset: PioAddressOffset, data: &mut [u8]) {
        data.fill(0);
    }

    fn pio_write(&self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        if offset == 0 && v & Self::SLP_EN != 0 && (v >> 2) & 7 == crate::acpi::S5_SLEEP_TYPE {
            self.off.store(true, Ordering::SeqCst);
        }
    }
}

/// Shared handles to the devices, for the VMM and its tests.
pub struct Devices<W: Write + Send + 'static> {
    /// COM1.
    pub serial: Arc<Mutex<SerialPort<W>>>,
    /// Exit status port.
    pub exit: Arc<ExitPort>,
    /// Parameter/data ports.
    pub test: Arc<TestPorts>,
    /// Keyboard controller (reset line).
    pub i8042: Arc<Mutex<I8042>>,
    /// CMOS RTC.
    pub cmos: Arc<Mutex<Cmos>>,
    /// ACPI sleep registers (power-off).
    pub sleep: Arc<AcpiSleep>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_device::DevicePio;

    #[test]
    fn devices_decode_their_registers() {
        let mut s = SerialPort::new(Vec::new());
        s.pio_write(PioAddress(0x3f8), 0, b"A");
        let mut lsr = [0u8];
        s.pio_read(PioAddress(0x3f8), 5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "transmitter empty");
        s.pio_write(PioAddress(0x3f8), 0x100, b"B");
        assert_eq!(s.writer(), b"A");
        let e = ExitPort::new();
        assert_eq!(e.status(), None);
        e.pio_write(PioAddress(0xf4), 0, &[7, 0, 0, 0]);
        assert_eq!(e.status(), Some(7));
        let mut b = [1u8; 2];
        e.pio_read(PioAddress(0xf4), 0, &mut b);
        assert_eq!(b, [0, 0]);
        let t = TestPorts::default();
        t.param.store(0x0102_0304, Ordering::SeqCst);
        let mut b = [0u8; 4];
        t.pio_read(PioAddress(0x510), 0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x0102_0304);
        t.pio_read(PioAddress(0x510), 1, &mut b);
        assert_eq!(b, [0; 4]);
        t.pio_write(PioAddress(0x510), 1, &[9, 0, 0, 0]);
        t.pio_write(PioAddress(0x510), 0, &[8, 0, 0, 0]);
        assert_eq!(*t.data.lock().unwrap(), vec![9]);
    }

    #[test]
    fn data_port_log_is_bounded() {
        let t = TestPorts::default();
        let n = TestPorts::MAX_RECORDED as u32 + 100;
        for i in 0..n {
            t.pio_write(PioAddress(0x510), 1, &i.to_le_bytes());
        }
        let log = t.data.lock().unwrap();
        assert_eq!(log.len(), TestPorts::MAX_RECORDED);
        assert_eq!(log[TestPorts::MAX_RECORDED - 2], n - 102);
        assert_eq!(log.last(), Some(&(n - 1)));
    }

    fn kbd(dev: &mut I8042, port: u16) -> u8 {
        let mut b = [0u8];
        dev.pio_read(PioAddress(port), 0, &mut b);
        b[0]
    }

    #[test]
    fn i8042_answers_linux_probe_and_pulses_reset() {
        let mut k = I8042::new();
        let reset = k.reset_requested();
        assert_eq!(
            kbd(&mut k, 0x64),
            0x14,
            "system flag, unlocked, buffers empty"
        );
        k.pio_write(PioAddress(0x64), 0, &[0x20]);
        assert_eq!(kbd(&mut k, 0x64) & 1, 1, "configuration byte waiting");
        assert_eq!(kbd(&mut k, 0x60), 0x61);
        assert_eq!(kbd(&mut k, 0x64) & 1, 0);
        k.pio_write(PioAddress(0x64), 0, &[0x60]);
        assert_eq!(kbd(&mut k, 0x64) & 0x08, 0x08, "expects the argument");
        k.pio_write(PioAddress(0x60), 0, &[0x47]);
        k.pio_write(PioAddress(0x64), 0, &[0x20]);
        assert_eq!(kbd(&mut k, 0x60), 0x47);
        k.pio_write(PioAddress(0x64), 0, &[0xa8]);
        k.pio_write(PioAddress(0x64), 0, &[0x20]);
        assert_eq!(kbd(&mut k, 0x60), 0x47 & !0x20);
        k.pio_write(PioAddress(0x64), 0, &[0xa7]);
        k.pio_write(PioAddress(0x64), 0, &[0x20]);
        assert_eq!(kbd(&mut k, 0x60), 0x67);
        for (cmd, answer) in [(0xaa, 0x55), (0xab, 0), (0xa9, 0), (0xd0, 3)] {
            k.pio_write(PioAddress(0x64), 0, &[cmd]);
            assert_eq!(kbd(&mut k, 0x60), answer, "command {cmd:#x}");
        }
        // A keyboard command gets no answer; an empty buffer reads 0.
        k.pio_write(PioAddress(0x60), 0, &[0xff]);
        assert_eq!(kbd(&mut k, 0x60), 0);
        assert_eq!(kbd(&mut k, 0x61), 0xff, "not a controller register");
        k.pio_write(PioAddress(0x61), 0, &[0xfe]);
        k.pio_write(PioAddress(0x64), 0, &[]);
        k.pio_write(PioAddress(0x64), 0, &[0x12]);
        // Writing the output port with bit 0 set keeps the CPU running.
        k.pio_write(PioAddress(0x64), 0, &[0xd1]);
        k.pio_write(PioAddress(0x60), 0, &[0x03]);
        assert!(!reset.load(Ordering::SeqCst));
        k.pio_write(PioAddress(0x64), 0, &[0xfe]);
        assert!(reset.load(Ordering::SeqCst));
        let mut k = I8042::default();
        let reset = k.reset_requested();
        k.pio_write(PioAddress(0x64), 0, &[0xd1]);
        k.pio_write(PioAddress(0x60), 0, &[0x02]);
        assert!(reset.load(Ordering::SeqCst), "output port bit 0 low resets");
    }

    #[test]
    fn serial_interrupts_signal_the_eventfd() {
        let fd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = SerialPort::with_irq(Vec::new(), SerialIrq::EventFd(fd.try_clone().unwrap()));
        // Non-blocking, so a missing interrupt fails the test instead of hanging it.
        // Enable the transmitter-empty interrupt (IER bit 1): the model raises it at once.
        s.pio_write(PioAddress(0x3f8), 1, &[0x02]);
        s.pio_write(PioAddress(0x3f8), 0, b"x");
        assert!(fd.read().unwrap() >= 1);
        assert_eq!(s.writer(), b"x");
        assert!(SerialIrq::None.trigger().is_ok());
    }

    #[test]
    fn acpi_sleep_powers_off_only_on_s5_with_slp_en() {
        let s = AcpiSleep::default();
        let off = s.power_off_requested();
        let mut b = [0xffu8];
        s.pio_read(PioAddress(0x600), 1, &mut b);
        assert_eq!(b, [0]);
        // S5 type without SLP_EN, SLP_EN with S3's type, the status register, no data.
        for (offset, v) in [(0u16, 5u8 << 2), (0, (3 << 2) | 0x20), (1, 0x34)] {
            s.pio_write(PioAddress(0x600), offset, &[v]);
        }
        s.pio_write(PioAddress(0x600), 0, &[]);
        assert!(!off.load(Ordering::SeqCst));
        s.pio_write(PioAddress(0x600), 0, &[(5 << 2) | 0x20]);
        assert!(off.load(Ordering::SeqCst));
    }

    #[test]
    fn rtc_time_is_bcd_utc() {
        assert_eq!(
            rtc_time(0),
            RtcTime {
                second: 0,
                minute: 0,
                hour: 0,
                weekday: 5,
                day: 1,
                month: 1,
                year: 0x70,
                century: 0x19
            }
        );
        // 2000-02-29 12:04:05, a Tuesday.
        assert_eq!(
            rtc_time(951_825_845),
            RtcTime {
                second: 0x05,
                minute: 0x04,
                hour: 0x12,
                weekday: 3,
                day: 0x29,
                month: 0x02,
                year: 0x00,
                century: 0x20
            }
        );
        // 2026-11-21 14:45:10, a Saturday.
        let t = rtc_time(1_795_272_310);
        assert_eq!((t.year, t.month, t.day, t.weekday), (0x26, 0x11, 0x21, 7));
        assert_eq!((t.hour, t.minute, t.second), (0x14, 0x45, 0x10));
    }

    #[test]
    fn cmos_reports_a_valid_clock_and_keeps_nvram() {
        let mut c = Cmos::default();
        let rd = |c: &mut Cmos, index: u8| {
            c.pio_write(PioAddress(0x70), 0, &[index | 0x80]);
            let mut b = [0u8];
            c.pio_read(PioAddress(0x70), 1, &mut b);
            b[0]
        };
        assert_eq!(rd(&mut c, 0x0a) & 0x80, 0, "no update in progress");
        assert_eq!(rd(&mut c, 0x0b), 0x02, "BCD, 24 hours");
        assert_eq!(rd(&mut c, 0x0d), 0x80, "valid RAM and time");
        assert_eq!(rd(&mut c, 0x0c), 0);
        let century = rd(&mut c, 0x32);
        assert!((0x20..=0x21).contains(&century), "{century:#x}");
        for (reg, max) in [(0, 0x59), (2, 0x59), (4, 0x23), (7, 0x31), (8, 0x12)] {
            let v = rd(&mut c, reg);
            assert!(v <= max && v & 0xf <= 9, "register {reg:#x} = {v:#x}");
        }
        let mut idx = [0u8];
        c.pio_read(PioAddress(0x70), 0, &mut idx);
        assert_eq!(idx[0], 0x08);
        // NVRAM bytes hold what is written; clock and status registers ignore writes.
        for (reg, value, back) in [(0x40u8, 0x5a, 0x5a), (0x0d, 0, 0x80), (0x0a, 0xa6, 0x26)] {
            c.pio_write(PioAddress(0x70), 0, &[reg]);
            c.pio_write(PioAddress(0x70), 1, &[value]);
            assert_eq!(rd(&mut c, reg), back, "register {reg:#x}");
        }
        c.pio_write(PioAddress(0x70), 2, &[1]);
        c.pio_write(PioAddress(0x70), 0, &[]);
        let mut b = [0u8];
        c.pio_read(PioAddress(0x70), 2, &mut b);
        assert_eq!(b[0], 0xff);
    }
}

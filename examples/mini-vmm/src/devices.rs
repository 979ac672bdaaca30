//! The mini-vmm's devices: a 16550 serial port (vm-superio) on COM1, the i8042 keyboard
//! controller's reset line (how a Linux guest started with `reboot=k` ends the VM), and the
//! small test-device ports the bundled guests use (exit status, parameter, data).
//!
//! The bundled guests poll the serial port, so its interrupt goes nowhere ([`SerialIrq::None`]).
//! A Linux guest drives the port with interrupts: there the line is an eventfd registered as
//! a KVM irqfd for GSI 4 ([`SerialIrq::EventFd`]), so raising it costs a `write(2)` and no
//! extra exit; KVM's in-kernel PIC/IOAPIC deliver it.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;
use vm_superio::{Serial, Trigger};

use vmm_sys_util::eventfd::EventFd;

/// The serial port's interrupt line.
#[derive(Debug)]
pub enum SerialIrq {
    /// Not connected (polling guests).
    None,
    /// An eventfd, registered by the VMM as an irqfd: each trigger is one edge on its GSI.
    EventFd(EventFd),
}

impl Trigger for SerialIrq {
    type E = std::io::Error;
    fn trigger(&self) -> Result<(), Self::E> {
        match self {
            SerialIrq::None => Ok(()),
            SerialIrq::EventFd(fd) => fd.write(1),
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
    /// Values written to 0x511.
    pub data: Mutex<Vec<u32>>,
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
            if let Ok(mut log) = self.data.lock() {
                log.push(u32::from_le_bytes(v));
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
}

//! The mini-vmm's devices: a 16550 serial port (vm-superio) on COM1 and the small
//! test-device ports the bundled guests use (exit status, parameter, data).

use std::io::Write;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;
use vm_superio::{Serial, Trigger};

/// Interrupt trigger for the serial port. The bundled guests poll, so the line goes nowhere
/// yet; a later irqfd-backed trigger replaces it.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoIrq;

impl Trigger for NoIrq {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        Ok(())
    }
}

/// COM1: vm-superio's 16550 model writing to `W`.
pub struct SerialPort<W: Write> {
    serial: Serial<NoIrq, vm_superio::serial::NoEvents, W>,
}

impl<W: Write> SerialPort<W> {
    /// A serial port writing guest output to `out`.
    pub fn new(out: W) -> Self {
        SerialPort {
            serial: Serial::new(NoIrq, out),
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

/// Shared handles to the devices, for the VMM and its tests.
pub struct Devices<W: Write + Send + 'static> {
    /// COM1.
    pub serial: Arc<Mutex<SerialPort<W>>>,
    /// Exit status port.
    pub exit: Arc<ExitPort>,
    /// Parameter/data ports.
    pub test: Arc<TestPorts>,
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
}

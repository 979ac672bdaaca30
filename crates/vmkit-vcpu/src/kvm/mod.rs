//! The KVM backend, on rust-vmm's `kvm-ioctls`.
//!
//! [`KvmHypervisor`] wraps `/dev/kvm`, [`KvmVm`] a VM fd and [`KvmVcpu`] a vCPU fd with its
//! `kvm_run` mapping. Conversion between KVM's structs and the neutral types of
//! [`crate::regs`] happens here and nowhere else.
//!
//! Exits are decoded by `kvm-ioctls` and mapped one to one onto [`VmExit`]; the few details
//! `kvm-ioctls` does not hand out (the internal-error words) are read from the `kvm_run`
//! page. `EINTR` from `KVM_RUN` (a kick or another signal) becomes [`VmExit::Interrupted`].

mod kick;
mod platform;

pub use platform::PLATFORM_STATE_VERSION;

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_debugregs, kvm_enable_cap, kvm_fpu, kvm_guest_debug, kvm_lapic_state, kvm_mp_state,
    kvm_regs, kvm_run, kvm_segment, kvm_sregs, kvm_userspace_memory_region, kvm_vcpu_events,
    kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_CAP_EXIT_HYPERCALL, KVM_CAP_X86_USER_SPACE_MSR,
    KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY, KVM_MSR_EXIT_REASON_FILTER, KVM_MSR_EXIT_REASON_INVAL,
    KVM_MSR_EXIT_REASON_UNKNOWN, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{Cap, Kvm, NoDatamatch, VcpuExit, VcpuFd, VmFd};
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

pub use kick::{kick_signal, KvmKick, KICK_SIGNAL_OFFSET};

use crate::exit::{Hypercall, MsrRead, MsrWrite, SystemEventKind, VmExit};
use crate::hypervisor::{
    Capability, DataMatch, Error, Hypervisor, IoEventAddress, MemoryFlags, Result, Vcpu, Vm,
};
use crate::regs::{
    CpuidEntry, DebugRegs, DescriptorTable, Fpu, LapicState, MpState, MsrEntry, Regs, Segment,
    SpecialRegs, VcpuEvents, Xcr, XsaveArea,
};

/// Bytes in `struct kvm_xsave` (KVM_GET_XSAVE / KVM_SET_XSAVE without the flexible tail).
const KVM_XSAVE_BYTES: usize = std::mem::size_of::<kvm_xsave>();

fn backend(op: &'static str) -> impl FnOnce(vmm_sys_util::errno::Error) -> Error {
    move |e| Error::Backend {
        op,
        source: std::io::Error::from_raw_os_error(e.errno()),
    }
}

/// The KVM hypervisor (`/dev/kvm`).
#[derive(Debug)]
pub struct KvmHypervisor {
    kvm: Kvm,
    msr_list: Arc<Vec<u32>>,
}

impl KvmHypervisor {
    /// Opens `/dev/kvm`.
    pub fn new() -> Result<Self> {
        let kvm = Kvm::new().map_err(backend("open /dev/kvm"))?;
        let msr_list = kvm
            .get_msr_index_list()
            .map_err(backend("KVM_GET_MSR_INDEX_LIST"))?
            .as_slice()
            .to_vec();
        Ok(KvmHypervisor {
            kvm,
            msr_list: Arc::new(msr_list),
        })
    }

    /// The underlying `kvm-ioctls` handle, for what the neutral traits do not cover.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }
}

impl Hypervisor for KvmHypervisor {
    type Vm = KvmVm;

    fn check_capability(&self, cap: Capability) -> bool {
        match cap {
            Capability::IrqChip => self.kvm.check_extension(Cap::Irqchip),
            Capability::Irqfd => self.kvm.check_extension(Cap::Irqfd),
            Capability::Ioeventfd => self.kvm.check_extension(Cap::Ioeventfd),
            Capability::DirtyLog => self.kvm.check_extension(Cap::UserMemory),
            Capability::UserMsrExits => {
                self.kvm
                    .check_extension_raw(u64::from(KVM_CAP_X86_USER_SPACE_MSR))
                    > 0
            }
            Capability::HypercallExits => {
                self.kvm
                    .check_extension_raw(u64::from(KVM_CAP_EXIT_HYPERCALL))
                    > 0
            }
            Capability::ImmediateExit => self.kvm.check_extension(Cap::ImmediateExit),
            Capability::ReadOnlyMemory => self.kvm.check_extension(Cap::ReadonlyMem),
        }
    }

    fn create_vm(&self) -> Result<KvmVm> {
        let fd = self.kvm.create_vm().map_err(backend("KVM_CREATE_VM"))?;
        Ok(KvmVm {
            fd,
            msr_list: self.msr_list.clone(),
            memory: Mutex::new(Vec::new()),
        })
    }

    fn supported_cpuid(&self) -> Result<Vec<CpuidEntry>> {
        let cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(backend("KVM_GET_SUPPORTED_CPUID"))?;
        Ok(cpuid
            .as_slice()
            .iter()
            .map(|e| CpuidEntry {
                function: e.function,
                index: e.index,
                flags: e.flags,
                eax: e.eax,
                ebx: e.ebx,
                ecx: e.ecx,
                edx: e.edx,
            })
            .collect())
    }
}

/// Keeps registered guest memory mapped for as long as the VM lives.
trait KeepAlive: Send + Sync {}
impl<T: Send + Sync> KeepAlive for T {}

/// A KVM virtual machine.
pub struct KvmVm {
    fd: VmFd,
    msr_list: Arc<Vec<u32>>,
    memory: Mutex<Vec<Box<dyn KeepAlive>>>,
}

impl std::fmt::Debug for KvmVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmVm")
            .field("fd", &self.fd.as_raw_fd())
            .finish()
    }
}

impl KvmVm {
    /// The underlying `kvm-ioctls` VM handle.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }
}

fn ioevent_call(
    vm: &VmFd,
    fd: &EventFd,
    addr: IoEventAddress,
    datamatch: DataMatch,
    register: bool,
) -> std::result::Result<(), vmm_sys_util::errno::Error> {
    let addr = match addr {
        IoEventAddress::Pio(p) => kvm_ioctls::IoEventAddress::Pio(p),
        IoEventAddress::Mmio(a) => kvm_ioctls::IoEventAddress::Mmio(a),
    };
    // kvm-ioctls takes the match length from the value's type: keep each width's own type.
    macro_rules! call {
        ($v:expr) => {
            if register {
                vm.register_ioevent(fd, &addr, $v)
            } else {
                vm.unregister_ioevent(fd, &addr, $v)
            }
        };
    }
    match datamatch {
        DataMatch::Any => call!(NoDatamatch),
        DataMatch::U8(v) => call!(v),
        DataMatch::U16(v) => call!(v),
        DataMatch::U32(v) => call!(v),
        DataMatch::U64(v) => call!(v),
    }
}

impl Vm for KvmVm {
    type Vcpu = KvmVcpu;

    fn register_memory<B: Bitmap + Send + Sync + 'static>(
        &self,
        mem: &GuestMemoryMmap<B>,
        first_slot: u32,
        flags: MemoryFlags,
    ) -> Result<()> {
        let mut kvm_flags = 0;
        if flags.log_dirty {
            kvm_flags |= KVM_MEM_LOG_DIRTY_PAGES;
        }
        if flags.read_only {
            kvm_flags |= KVM_MEM_READONLY;
        }
        for (i, region) in mem.iter().enumerate() {
            let slot = u32::try_from(i)
                .ok()
                .and_then(|i| first_slot.checked_add(i))
                .ok_or_else(|| Error::InvalidArgument(format!("slot {first_slot} + {i}")))?;
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| Error::InvalidArgument(format!("region without host mapping: {e}")))?;
            let region = kvm_userspace_memory_region {
                slot,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
                flags: kvm_flags,
            };
            // SAFETY: the host range is a live mapping owned by `mem`'s regions; a clone of
            // `mem` (sharing those regions through `Arc`s) is stored in `self.memory` below
            // and dropped only with the VM, so the mapping outlives every guest access.
            unsafe { self.fd.set_user_memory_region(region) }
                .map_err(backend("KVM_SET_USER_MEMORY_REGION"))?;
        }
        if let Ok(mut keep) = self.memory.lock() {
            keep.push(Box::new(mem.clone()));
        }
        Ok(())
    }

    fn create_vcpu(&self, id: u32) -> Result<KvmVcpu> {
        let mut fd = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(backend("KVM_CREATE_VCPU"))?;
        let run: *mut kvm_run = fd.get_kvm_run();
        let kick = kick::KickState::new().map_err(|source| Error::Backend {
            op: "install the kick signal handler",
            source,
        })?;
        // KVM_CAP_XSAVE2 gives the XSAVE image size including dynamically enabled
        // components (0 on kernels before 5.17, whose image is always the 4096-byte struct).
        let xsave2 = self.fd.check_extension_int(Cap::Xsave2);
        let xsave_size = usize::try_from(xsave2).unwrap_or(0).max(KVM_XSAVE_BYTES);
        Ok(KvmVcpu {
            id,
            fd,
            run,
            kick,
            msr_list: self.msr_list.clone(),
            xsave_size,
        })
    }

    fn create_irq_chip(&self) -> Result<()> {
        self.fd
            .create_irq_chip()
            .map_err(backend("KVM_CREATE_IRQCHIP"))
    }

    fn set_irq_line(&self, irq: u32, level: bool) -> Result<()> {
        self.fd
            .set_irq_line(irq, level)
            .map_err(backend("KVM_IRQ_LINE"))
    }

    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<()> {
        self.fd
            .register_irqfd(fd, gsi)
            .map_err(backend("KVM_IRQFD"))
    }

    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<()> {
        self.fd
            .unregister_irqfd(fd, gsi)
            .map_err(backend("KVM_IRQFD (deassign)"))
    }

    fn register_ioevent(
        &self,
        fd: &EventFd,
        addr: IoEventAddress,
        datamatch: DataMatch,
    ) -> Result<()> {
        ioevent_call(&self.fd, fd, addr, datamatch, true).map_err(backend("KVM_IOEVENTFD"))
    }

    fn unregister_ioevent(
        &self,
        fd: &EventFd,
        addr: IoEventAddress,
        datamatch: DataMatch,
    ) -> Result<()> {
        ioevent_call(&self.fd, fd, addr, datamatch, false)
            .map_err(backend("KVM_IOEVENTFD (deassign)"))
    }

    fn dirty_log(&self, slot: u32, len: usize) -> Result<Vec<u64>> {
        self.fd
            .get_dirty_log(slot, len)
            .map_err(backend("KVM_GET_DIRTY_LOG"))
    }

    fn enable_user_msr_exits(&self) -> Result<()> {
        let mut cap = kvm_enable_cap {
            cap: KVM_CAP_X86_USER_SPACE_MSR,
            ..Default::default()
        };
        cap.args[0] = u64::from(
            KVM_MSR_EXIT_REASON_UNKNOWN | KVM_MSR_EXIT_REASON_INVAL | KVM_MSR_EXIT_REASON_FILTER,
        );
        self.fd
            .enable_cap(&cap)
            .map_err(backend("KVM_ENABLE_CAP(X86_USER_SPACE_MSR)"))
    }

    fn enable_hypercall_exits(&self, mask: u64) -> Result<()> {
        let mut cap = kvm_enable_cap {
            cap: KVM_CAP_EXIT_HYPERCALL,
            ..Default::default()
        };
        cap.args[0] = mask;
        self.fd
            .enable_cap(&cap)
            .map_err(backend("KVM_ENABLE_CAP(EXIT_HYPERCALL)"))
    }
}

/// KVM's dirty log feeds `vmkit-memory`'s dirty tracking (slot `i` = region `i` when the
/// memory was registered with `first_slot` 0).
impl vmkit_memory::HypervisorDirtyLog for KvmVm {
    type Error = Error;

    fn get_and_clear_dirty(&self, slot: u32, len: usize) -> Result<Vec<u64>> {
        self.dirty_log(slot, len)
    }
}

/// A KVM vCPU.
#[derive(Debug)]
pub struct KvmVcpu {
    id: u32,
    fd: VcpuFd,
    /// The vCPU's `kvm_run` mapping; owned by `fd` and valid as long as it.
    run: *mut kvm_run,
    kick: Arc<kick::KickState>,
    msr_list: Arc<Vec<u32>>,
    /// Size of this vCPU's XSAVE image (see `create_vcpu`).
    xsave_size: usize,
}

// SAFETY: `run` points into the mmap owned by `fd`, which moves with the struct; the raw
// pointer is only dereferenced by the thread that holds `&mut self` (in `run`), so sending the
// vCPU to another thread is as safe as sending `VcpuFd` (which is `Send`).
unsafe impl Send for KvmVcpu {}

impl KvmVcpu {
    /// The underlying `kvm-ioctls` vCPU handle.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Mutable access to the `kvm-ioctls` vCPU, e.g. to run it directly. Running it this way
    /// bypasses the kick handshake: a kick then only takes effect at the next
    /// [`Vcpu::run`].
    pub fn fd_mut(&mut self) -> &mut VcpuFd {
        &mut self.fd
    }

    fn immediate_exit_ptr(&self) -> *mut u8 {
        // SAFETY: `run` is the live `kvm_run` mapping of `fd`; taking a field address
        // creates no reference.
        unsafe { std::ptr::addr_of_mut!((*self.run).immediate_exit) }
    }

    fn clear_immediate_exit(&self) {
        // SAFETY: as in `immediate_exit_ptr`; the byte is shared with the kernel and with our
        // own signal handler, hence the atomic store.
        unsafe { std::sync::atomic::AtomicU8::from_ptr(self.immediate_exit_ptr()) }
            .store(0, std::sync::atomic::Ordering::SeqCst);
    }
}

fn system_event_kind(kind: u32) -> SystemEventKind {
    match kind {
        KVM_SYSTEM_EVENT_SHUTDOWN => SystemEventKind::Shutdown,
        KVM_SYSTEM_EVENT_RESET => SystemEventKind::Reset,
        KVM_SYSTEM_EVENT_CRASH => SystemEventKind::Crash,
        other => SystemEventKind::Other(other),
    }
}

impl Vcpu for KvmVcpu {
    type Kick = KvmKick;

    fn id(&self) -> u32 {
        self.id
    }

    fn kick_handle(&self) -> KvmKick {
        KvmKick {
            state: self.kick.clone(),
        }
    }

    fn run(&mut self) -> Result<VmExit<'_>> {
        let ie = self.immediate_exit_ptr();
        if self.kick.enter(ie) {
            self.kick.leave();
            self.clear_immediate_exit();
            return Ok(VmExit::Interrupted);
        }
        let run_ptr = self.run;
        let result = self.fd.run();
        self.kick.leave();
        let exit = match result {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.kick.take_kicked();
                // SAFETY: see `clear_immediate_exit`; `result`'s borrow of `fd` holds no data.
                unsafe { std::sync::atomic::AtomicU8::from_ptr(ie) }
                    .store(0, std::sync::atomic::Ordering::SeqCst);
                return Ok(VmExit::Interrupted);
            }
            Err(e) => return Err(backend("KVM_RUN")(e)),
        };
        Ok(match exit {
            VcpuExit::IoIn(port, data) => VmExit::IoIn { port, data },
            VcpuExit::IoOut(port, data) => VmExit::IoOut { port, data },
            VcpuExit::MmioRead(addr, data) => VmExit::MmioRead { addr, data },
            VcpuExit::MmioWrite(addr, data) => VmExit::MmioWrite { addr, data },
            VcpuExit::Hlt => VmExit::Halt,
            VcpuExit::Shutdown => VmExit::Shutdown,
            VcpuExit::SystemEvent(kind, _) => VmExit::SystemEvent {
                kind: system_event_kind(kind),
            },
            VcpuExit::Hypercall(h) => {
                *h.ret = 0;
                VmExit::Hypercall(Hypercall {
                    nr: h.nr,
                    args: h.args,
                    ret: h.ret,
                })
            }
            VcpuExit::X86Rdmsr(m) => {
                *m.error = 0;
                VmExit::MsrRead(MsrRead {
                    index: m.index,
                    data: m.data,
                    fault: m.error,
                })
            }
            VcpuExit::X86Wrmsr(m) => {
                *m.error = 0;
                VmExit::MsrWrite(MsrWrite {
                    index: m.index,
                    value: m.data,
                    fault: m.error,
                })
            }
            VcpuExit::Debug(d) => VmExit::Debug {
                pc: d.pc,
                exception: d.exception,
            },
            VcpuExit::Intr => VmExit::Interrupted,
            VcpuExit::FailEntry(reason, cpu) => VmExit::FailEntry { reason, cpu },
            VcpuExit::InternalError => {
                // SAFETY: `run_ptr` is the live kvm_run mapping; the exit reason says the
                // `internal` member of the union is the valid one. The `VcpuExit` value holds
                // no reference into the page.
                let internal = unsafe { (*run_ptr).__bindgen_anon_1.internal };
                let ndata = internal.ndata.min(4);
                let mut data = [0u64; 4];
                for (d, s) in data
                    .iter_mut()
                    .zip(internal.data.iter())
                    .take(ndata as usize)
                {
                    *d = *s;
                }
                VmExit::InternalError {
                    suberror: internal.suberror,
                    data,
                    ndata,
                }
            }
            VcpuExit::Unsupported(reason) => VmExit::Unknown { reason },
            _ => {
                // SAFETY: as above; exit_reason is a plain integer field.
                let reason = unsafe { (*run_ptr).exit_reason };
                VmExit::Unknown { reason }
            }
        })
    }

    fn regs(&self) -> Result<Regs> {
        let r = self.fd.get_regs().map_err(backend("KVM_GET_REGS"))?;
        Ok(Regs {
            rax: r.rax,
            rbx: r.rbx,
            rcx: r.rcx,
            rdx: r.rdx,
            rsi: r.rsi,
            rdi: r.rdi,
            rsp: r.rsp,
            rbp: r.rbp,
            r8: r.r8,
            r9: r.r9,
            r10: r.r10,
            r11: r.r11,
            r12: r.r12,
            r13: r.r13,
            r14: r.r14,
            r15: r.r15,
            rip: r.rip,
            rflags: r.rflags,
        })
    }

    fn set_regs(&self, r: &Regs) -> Result<()> {
        let k = kvm_regs {
            rax: r.rax,
            rbx: r.rbx,
            rcx: r.rcx,
            rdx: r.rdx,
            rsi: r.rsi,
            rdi: r.rdi,
            rsp: r.rsp,
            rbp: r.rbp,
            r8: r.r8,
            r9: r.r9,
            r10: r.r10,
            r11: r.r11,
            r12: r.r12,
            r13: r.r13,
            r14: r.r14,
            r15: r.r15,
            rip: r.rip,
            rflags: r.rflags,
        };
        self.fd.set_regs(&k).map_err(backend("KVM_SET_REGS"))
    }

    fn sregs(&self) -> Result<SpecialRegs> {
        let s = self.fd.get_sregs().map_err(backend("KVM_GET_SREGS"))?;
        Ok(sregs_from_kvm(&s))
    }

    fn set_sregs(&self, sregs: &SpecialRegs) -> Result<()> {
        self.fd
            .set_sregs(&sregs_to_kvm(sregs))
            .map_err(backend("KVM_SET_SREGS"))
    }

    fn fpu(&self) -> Result<Fpu> {
        let f = self.fd.get_fpu().map_err(backend("KVM_GET_FPU"))?;
        Ok(Fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        })
    }

    fn set_fpu(&self, f: &Fpu) -> Result<()> {
        let k = kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        };
        self.fd.set_fpu(&k).map_err(backend("KVM_SET_FPU"))
    }

    fn xsave(&self) -> Result<XsaveArea> {
        if self.xsave_size > KVM_XSAVE_BYTES {
            // Dynamically enabled components (AMX) need KVM_GET_XSAVE2 and a larger buffer;
            // refusing is better than saving a truncated image.
            return Err(Error::Unsupported(
                "XSAVE images larger than 4096 bytes (dynamically enabled XSTATE components)",
            ));
        }
        let x = self.fd.get_xsave().map_err(backend("KVM_GET_XSAVE"))?;
        let bytes = x.region.iter().flat_map(|w| w.to_le_bytes()).collect();
        Ok(XsaveArea { bytes })
    }

    fn set_xsave(&self, xsave: &XsaveArea) -> Result<()> {
        if self.xsave_size > KVM_XSAVE_BYTES {
            return Err(Error::Unsupported(
                "XSAVE images larger than 4096 bytes (dynamically enabled XSTATE components)",
            ));
        }
        if xsave.bytes.len() != KVM_XSAVE_BYTES {
            return Err(Error::InvalidArgument(format!(
                "XSAVE image of {} bytes; this vCPU's is {KVM_XSAVE_BYTES}",
                xsave.bytes.len()
            )));
        }
        let mut k = kvm_xsave::default();
        for (w, b) in k.region.iter_mut().zip(xsave.bytes.chunks_exact(4)) {
            *w = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        // SAFETY: `k` is a whole `kvm_xsave`, and KVM reads no more than that: this vCPU's
        // XSAVE size (KVM_CAP_XSAVE2, checked above) is at most the struct's 4096 bytes.
        unsafe { self.fd.set_xsave(&k) }.map_err(backend("KVM_SET_XSAVE"))
    }

    fn xcrs(&self) -> Result<Vec<Xcr>> {
        let x = self.fd.get_xcrs().map_err(backend("KVM_GET_XCRS"))?;
        let n = usize::try_from(x.nr_xcrs)
            .unwrap_or(usize::MAX)
            .min(x.xcrs.len());
        Ok(x.xcrs[..n]
            .iter()
            .map(|e| Xcr {
                index: e.xcr,
                value: e.value,
            })
            .collect())
    }

    fn set_xcrs(&self, xcrs: &[Xcr]) -> Result<()> {
        let mut k = kvm_xcrs::default();
        if xcrs.len() > k.xcrs.len() {
            return Err(Error::InvalidArgument(format!(
                "{} extended control registers (KVM takes at most {})",
                xcrs.len(),
                k.xcrs.len()
            )));
        }
        k.nr_xcrs = xcrs.len() as u32;
        for (d, x) in k.xcrs.iter_mut().zip(xcrs) {
            d.xcr = x.index;
            d.value = x.value;
        }
        self.fd.set_xcrs(&k).map_err(backend("KVM_SET_XCRS"))
    }

    fn debug_regs(&self) -> Result<DebugRegs> {
        let d = self
            .fd
            .get_debug_regs()
            .map_err(backend("KVM_GET_DEBUGREGS"))?;
        Ok(DebugRegs {
            db: d.db,
            dr6: d.dr6,
            dr7: d.dr7,
        })
    }

    fn set_debug_regs(&self, regs: &DebugRegs) -> Result<()> {
        let k = kvm_debugregs {
            db: regs.db,
            dr6: regs.dr6,
            dr7: regs.dr7,
            ..Default::default()
        };
        self.fd
            .set_debug_regs(&k)
            .map_err(backend("KVM_SET_DEBUGREGS"))
    }

    fn msrs(&self, indices: &[u32]) -> Result<Vec<MsrEntry>> {
        let entries: Vec<kvm_bindings::kvm_msr_entry> = indices
            .iter()
            .map(|&index| kvm_bindings::kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|e| Error::InvalidArgument(format!("{} MSRs: {e:?}", indices.len())))?;
        let n = self
            .fd
            .get_msrs(&mut msrs)
            .map_err(backend("KVM_GET_MSRS"))?;
        Ok(msrs
            .as_slice()
            .iter()
            .take(n)
            .map(|e| MsrEntry {
                index: e.index,
                data: e.data,
            })
            .collect())
    }

    fn set_msrs(&self, msrs: &[MsrEntry]) -> Result<()> {
        let entries: Vec<kvm_bindings::kvm_msr_entry> = msrs
            .iter()
            .map(|m| kvm_bindings::kvm_msr_entry {
                index: m.index,
                data: m.data,
                ..Default::default()
            })
            .collect();
        let kmsrs = Msrs::from_entries(&entries)
            .map_err(|e| Error::InvalidArgument(format!("{} MSRs: {e:?}", msrs.len())))?;
        let n = self.fd.set_msrs(&kmsrs).map_err(backend("KVM_SET_MSRS"))?;
        if n != msrs.len() {
            let bad = msrs.get(n).map(|m| m.index).unwrap_or(0);
            return Err(Error::InvalidArgument(format!(
                "KVM accepted {n} of {} MSRs; MSR {bad:#x} was refused",
                msrs.len()
            )));
        }
        Ok(())
    }

    fn saveable_msrs(&self) -> Result<Vec<u32>> {
        Ok(self.msr_list.as_ref().clone())
    }

    fn lapic(&self) -> Result<LapicState> {
        let l = self.fd.get_lapic().map_err(backend("KVM_GET_LAPIC"))?;
        let mut regs = [0u8; 1024];
        for (d, s) in regs.iter_mut().zip(l.regs.iter()) {
            *d = *s as u8;
        }
        Ok(LapicState { regs })
    }

    fn set_lapic(&self, lapic: &LapicState) -> Result<()> {
        let mut l = kvm_lapic_state::default();
        for (d, s) in l.regs.iter_mut().zip(lapic.regs.iter()) {
            *d = *s as libc::c_char;
        }
        self.fd.set_lapic(&l).map_err(backend("KVM_SET_LAPIC"))
    }

    fn events(&self) -> Result<VcpuEvents> {
        let e = self
            .fd
            .get_vcpu_events()
            .map_err(backend("KVM_GET_VCPU_EVENTS"))?;
        Ok(VcpuEvents {
            exception_injected: e.exception.injected != 0,
            exception_nr: e.exception.nr,
            exception_has_error_code: e.exception.has_error_code != 0,
            exception_pending: e.exception.pending != 0,
            exception_error_code: e.exception.error_code,
            interrupt_injected: e.interrupt.injected != 0,
            interrupt_nr: e.interrupt.nr,
            interrupt_soft: e.interrupt.soft != 0,
            interrupt_shadow: e.interrupt.shadow,
            nmi_injected: e.nmi.injected != 0,
            nmi_pending: e.nmi.pending != 0,
            nmi_masked: e.nmi.masked != 0,
            sipi_vector: e.sipi_vector,
            flags: e.flags,
            smi_smm: e.smi.smm != 0,
            smi_pending: e.smi.pending != 0,
            smi_inside_nmi: e.smi.smm_inside_nmi != 0,
            smi_latched_init: e.smi.latched_init,
            triple_fault_pending: e.triple_fault.pending != 0,
            exception_has_payload: e.exception_has_payload != 0,
            exception_payload: e.exception_payload,
        })
    }

    fn set_events(&self, v: &VcpuEvents) -> Result<()> {
        let mut e = kvm_vcpu_events::default();
        e.exception.injected = v.exception_injected.into();
        e.exception.nr = v.exception_nr;
        e.exception.has_error_code = v.exception_has_error_code.into();
        e.exception.pending = v.exception_pending.into();
        e.exception.error_code = v.exception_error_code;
        e.interrupt.injected = v.interrupt_injected.into();
        e.interrupt.nr = v.interrupt_nr;
        e.interrupt.soft = v.interrupt_soft.into();
        e.interrupt.shadow = v.interrupt_shadow;
        e.nmi.injected = v.nmi_injected.into();
        e.nmi.pending = v.nmi_pending.into();
        e.nmi.masked = v.nmi_masked.into();
        e.sipi_vector = v.sipi_vector;
        e.flags = v.flags;
        e.smi.smm = v.smi_smm.into();
        e.smi.pending = v.smi_pending.into();
        e.smi.smm_inside_nmi = v.smi_inside_nmi.into();
        e.smi.latched_init = v.smi_latched_init;
        e.triple_fault.pending = v.triple_fault_pending.into();
        e.exception_has_payload = v.exception_has_payload.into();
        e.exception_payload = v.exception_payload;
        self.fd
            .set_vcpu_events(&e)
            .map_err(backend("KVM_SET_VCPU_EVENTS"))
    }

    fn mp_state(&self) -> Result<MpState> {
        let s = self
            .fd
            .get_mp_state()
            .map_err(backend("KVM_GET_MP_STATE"))?;
        Ok(match s.mp_state {
            kvm_bindings::KVM_MP_STATE_RUNNABLE => MpState::Runnable,
            kvm_bindings::KVM_MP_STATE_UNINITIALIZED => MpState::Uninitialized,
            kvm_bindings::KVM_MP_STATE_INIT_RECEIVED => MpState::InitReceived,
            kvm_bindings::KVM_MP_STATE_HALTED => MpState::Halted,
            kvm_bindings::KVM_MP_STATE_SIPI_RECEIVED => MpState::SipiReceived,
            other => MpState::Other(other),
        })
    }

    fn set_mp_state(&self, state: MpState) -> Result<()> {
        let mp_state = match state {
            MpState::Runnable => kvm_bindings::KVM_MP_STATE_RUNNABLE,
            MpState::Uninitialized => kvm_bindings::KVM_MP_STATE_UNINITIALIZED,
            MpState::InitReceived => kvm_bindings::KVM_MP_STATE_INIT_RECEIVED,
            MpState::Halted => kvm_bindings::KVM_MP_STATE_HALTED,
            MpState::SipiReceived => kvm_bindings::KVM_MP_STATE_SIPI_RECEIVED,
            MpState::Other(o) => o,
        };
        self.fd
            .set_mp_state(kvm_mp_state { mp_state })
            .map_err(backend("KVM_SET_MP_STATE"))
    }

    fn set_cpuid(&self, entries: &[CpuidEntry]) -> Result<()> {
        let k: Vec<kvm_bindings::kvm_cpuid_entry2> = entries
            .iter()
            .map(|e| kvm_bindings::kvm_cpuid_entry2 {
                function: e.function,
                index: e.index,
                flags: e.flags,
                eax: e.eax,
                ebx: e.ebx,
                ecx: e.ecx,
                edx: e.edx,
                ..Default::default()
            })
            .collect();
        let cpuid = CpuId::from_entries(&k)
            .map_err(|e| Error::InvalidArgument(format!("{} CPUID entries: {e:?}", k.len())))?;
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(backend("KVM_SET_CPUID2"))
    }

    fn translate_gva(&self, gva: u64) -> Result<Option<u64>> {
        let t = self
            .fd
            .translate_gva(gva)
            .map_err(backend("KVM_TRANSLATE"))?;
        Ok((t.valid != 0).then_some(t.physical_address))
    }

    fn set_single_step(&self, enable: bool) -> Result<()> {
        let control = if enable {
            KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP
        } else {
            0
        };
        let dbg = kvm_guest_debug {
            control,
            ..Default::default()
        };
        self.fd
            .set_guest_debug(&dbg)
            .map_err(backend("KVM_SET_GUEST_DEBUG"))
    }

    fn complete_pending_exit(&mut self) -> Result<()> {
        // With immediate_exit set, KVM_RUN finishes the pending I/O or MMIO emulation and
        // returns EINTR before entering the guest (the KVM API's documented way).
        let ie = self.immediate_exit_ptr();
        // SAFETY: see `clear_immediate_exit`.
        unsafe { std::sync::atomic::AtomicU8::from_ptr(ie) }
            .store(1, std::sync::atomic::Ordering::SeqCst);
        let r = self.fd.run().map(|_| ()).map_err(|e| e.errno());
        self.clear_immediate_exit();
        match r {
            Err(libc::EINTR) | Ok(()) => Ok(()),
            Err(errno) => Err(Error::Backend {
                op: "KVM_RUN (complete pending exit)",
                source: std::io::Error::from_raw_os_error(errno),
            }),
        }
    }

    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.fd.as_raw_fd())
    }
}

fn seg_from_kvm(s: &kvm_segment) -> Segment {
    Segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present != 0,
        dpl: s.dpl,
        db: s.db != 0,
        s: s.s != 0,
        l: s.l != 0,
        g: s.g != 0,
        avl: s.avl != 0,
        unusable: s.unusable != 0,
    }
}

fn seg_to_kvm(s: &Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present.into(),
        dpl: s.dpl,
        db: s.db.into(),
        s: s.s.into(),
        l: s.l.into(),
        g: s.g.into(),
        avl: s.avl.into(),
        unusable: s.unusable.into(),
        padding: 0,
    }
}

fn sregs_from_kvm(s: &kvm_sregs) -> SpecialRegs {
    SpecialRegs {
        cs: seg_from_kvm(&s.cs),
        ds: seg_from_kvm(&s.ds),
        es: seg_from_kvm(&s.es),
        fs: seg_from_kvm(&s.fs),
        gs: seg_from_kvm(&s.gs),
        ss: seg_from_kvm(&s.ss),
        tr: seg_from_kvm(&s.tr),
        ldt: seg_from_kvm(&s.ldt),
        gdt: DescriptorTable {
            base: s.gdt.base,
            limit: s.gdt.limit,
        },
        idt: DescriptorTable {
            base: s.idt.base,
            limit: s.idt.limit,
        },
        cr0: s.cr0,
        cr2: s.cr2,
        cr3: s.cr3,
        cr4: s.cr4,
        cr8: s.cr8,
        efer: s.efer,
        apic_base: s.apic_base,
        interrupt_bitmap: s.interrupt_bitmap,
    }
}

fn sregs_to_kvm(s: &SpecialRegs) -> kvm_sregs {
    let mut k = kvm_sregs {
        cs: seg_to_kvm(&s.cs),
        ds: seg_to_kvm(&s.ds),
        es: seg_to_kvm(&s.es),
        fs: seg_to_kvm(&s.fs),
        gs: seg_to_kvm(&s.gs),
        ss: seg_to_kvm(&s.ss),
        tr: seg_to_kvm(&s.tr),
        ldt: seg_to_kvm(&s.ldt),
        cr0: s.cr0,
        cr2: s.cr2,
        cr3: s.cr3,
        cr4: s.cr4,
        cr8: s.cr8,
        efer: s.efer,
        apic_base: s.apic_base,
        interrupt_bitmap: s.interrupt_bitmap,
        ..Default::default()
    };
    k.gdt.base = s.gdt.base;
    k.gdt.limit = s.gdt.limit;
    k.idt.base = s.idt.base;
    k.idt.limit = s.idt.limit;
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sregs_round_trip_through_kvm_layout() {
        let mut s = SpecialRegs::default();
        s.cs = Segment {
            base: 1,
            limit: 2,
            selector: 8,
            type_: 11,
            present: true,
            dpl: 3,
            db: false,
            s: true,
            l: true,
            g: true,
            avl: true,
            unusable: false,
        };
        s.tr.unusable = true;
        s.gdt = DescriptorTable {
            base: 0x500,
            limit: 23,
        };
        s.idt = DescriptorTable {
            base: 0x600,
            limit: 7,
        };
        s.cr0 = 0x8000_0011;
        s.efer = 0x500;
        s.interrupt_bitmap = [1, 2, 3, 4];
        assert_eq!(sregs_from_kvm(&sregs_to_kvm(&s)), s);
        assert_eq!(
            system_event_kind(KVM_SYSTEM_EVENT_RESET),
            SystemEventKind::Reset
        );
        assert_eq!(
            system_event_kind(KVM_SYSTEM_EVENT_SHUTDOWN),
            SystemEventKind::Shutdown
        );
        assert_eq!(
            system_event_kind(KVM_SYSTEM_EVENT_CRASH),
            SystemEventKind::Crash
        );
        assert_eq!(system_event_kind(77), SystemEventKind::Other(77));
    }
}

//! Behaviour across modules: the path a VMM takes from a layout to snapshots and resets, with
//! the recording fake standing in for the hypervisor.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmkit_memory::{
    snapshot, Backing, DirtyTracker, E820Type, FastReset, MemoryLayout, RecordingDirtyLog,
    SnapshotError, SnapshotKind,
};

fn contents(mem: &vmkit_memory::GuestRam) -> Vec<u8> {
    let mut out = Vec::new();
    for r in mem.iter() {
        let mut v = vec![0u8; r.len() as usize];
        mem.read_slice(&mut v, r.start_addr()).unwrap();
        out.extend(v);
    }
    out
}

/// A 3 GiB + 64 MiB PC: two regions around the hole, so two slots. Only built and
/// inspected (the pages are never touched, so this is cheap).
#[test]
fn pc_guest_regions_become_slots_and_e820() {
    let layout = MemoryLayout::x86_pc((3 << 30) + (64 << 20)).unwrap();
    let mem = Backing::memfd().build(&layout).unwrap();

    // What the vCPU layer does: one KVM slot per region, E820 for boot params.
    let slots: Vec<_> = mem
        .regions()
        .iter()
        .map(|r| (r.slot, r.guest_addr.0, r.size, r.host_addr))
        .collect();
    assert_eq!(slots.len(), 2);
    assert_eq!((slots[1].0, slots[1].1, slots[1].2), (1, 4 << 30, 64 << 20));
    assert!(mem
        .regions()
        .iter()
        .all(|r| r.file_offset.is_some() && r.guarded));
    let e820 = layout.e820();
    assert!(e820.iter().all(|e| !layout.is_mmio(e.addr)));
    assert_eq!(e820.iter().filter(|e| e.kind == E820Type::Ram).count(), 3);
    mem.ram()
        .write_obj(1u8, GuestAddress((4 << 30) + (64 << 20) - 1))
        .unwrap();
}

/// The same shape in miniature (RAM below an MMIO hole and above 4 GiB), through dirty
/// tracking, full and incremental snapshots, lazy restore and fast reset.
#[test]
fn guest_from_layout_to_incremental_snapshot_and_reset() {
    let mut layout =
        MemoryLayout::new(&[(GuestAddress(0), 8 << 20), (GuestAddress(4 << 30), 2 << 20)]).unwrap();
    layout.add_mmio_hole(3 << 30, 1 << 30).unwrap();
    let mem = Backing::memfd().build(&layout).unwrap();

    // Dirty tracking across both slots, then a full and an incremental snapshot.
    let hv = RecordingDirtyLog::new();
    let mut tracker = DirtyTracker::with_hypervisor(mem.ram(), &hv);
    mem.ram()
        .write_slice(b"kernel", GuestAddress(0x10_0000))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let full_path = dir.path().join("full.snap");
    let full = std::fs::File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&full_path)
        .unwrap();
    let base = snapshot::write_full(mem.ram(), &full).unwrap();
    tracker.clear(mem.ram()).unwrap();

    hv.guest_write(mem.ram(), GuestAddress((4 << 30) + 0x1000), b"guest")
        .unwrap();
    mem.ram()
        .write_obj(0x42u8, GuestAddress(0x20_0000))
        .unwrap();
    let later = contents(mem.ram());
    let dirty = tracker.take(mem.ram()).unwrap();
    assert_eq!(dirty.count(), 2);
    let inc = tempfile::tempfile().unwrap();
    let inc_info = snapshot::write_incremental(mem.ram(), &dirty, base.id, &inc).unwrap();
    assert_eq!(inc_info.kind, SnapshotKind::Incremental);

    // A fresh VM restored from base + increment equals the source.
    let other = Backing::anonymous().build(&layout).unwrap();
    snapshot::restore_copy(other.ram(), &full).unwrap();
    snapshot::restore_copy(other.ram(), &inc).unwrap();
    assert_eq!(contents(other.ram()), later);

    // Lazy restore of the base gives the base contents.
    let lazy = snapshot::restore_mmap(&full, &Default::default()).unwrap();
    let mut word = [0u8; 6];
    lazy.ram()
        .read_slice(&mut word, GuestAddress(0x10_0000))
        .unwrap();
    assert_eq!(&word, b"kernel");
    assert_eq!(
        lazy.ram().read_obj::<u8>(GuestAddress(0x20_0000)).unwrap(),
        0
    );

    // Fast reset of the original VM back to the base snapshot, repeatedly.
    let mut reset = FastReset::from_snapshot(
        mem.ram(),
        &full,
        DirtyTracker::with_hypervisor(mem.ram(), &hv),
    )
    .unwrap();
    let baseline = contents(mem.ram());
    for i in 0..5u64 {
        hv.guest_write(mem.ram(), GuestAddress(i * 0x10_0000), &[0xff; 100])
            .unwrap();
        mem.ram()
            .write_obj(i, GuestAddress((4 << 30) + i * 0x2000))
            .unwrap();
        assert!(reset.reset(mem.ram()).unwrap().pages >= 2);
        assert_eq!(contents(mem.ram()), baseline);
    }
}

#[test]
fn restore_into_wrong_layout_is_refused_without_writes() {
    let small = Backing::anonymous()
        .build(&MemoryLayout::x86_pc(4 << 20).unwrap())
        .unwrap();
    small.ram().write_obj(7u8, GuestAddress(0x1000)).unwrap();
    let f = tempfile::tempfile().unwrap();
    snapshot::write_full(small.ram(), &f).unwrap();
    let big = Backing::anonymous()
        .build(&MemoryLayout::x86_pc(8 << 20).unwrap())
        .unwrap();
    big.ram().write_obj(9u8, GuestAddress(0x1000)).unwrap();
    let err = snapshot::restore_copy(big.ram(), &f).unwrap_err();
    assert!(matches!(err, SnapshotError::LayoutMismatch { .. }));
    assert!(err.to_string().contains("(0, 400000)"), "{err}");
    assert_eq!(big.ram().read_obj::<u8>(GuestAddress(0x1000)).unwrap(), 9);
}

#[test]
fn file_backed_memory_with_huge_pages_requested() {
    let dir = tempfile::tempdir().unwrap();
    let layout = MemoryLayout::x86_pc(4 << 20).unwrap();
    let mem = Backing::file(dir.path().join("ram"))
        .with_huge_pages(true)
        .with_guard_pages(false)
        .build(&layout)
        .unwrap();
    // Huge pages do not apply to a regular shared file: reported as normal pages.
    assert_eq!(mem.regions()[0].huge_pages, vmkit_memory::HugePages::No);
    assert!(!mem.regions()[0].guarded);
    mem.ram().write_obj(1u32, GuestAddress(0x3f_fffc)).unwrap();
    assert_eq!(mem.ram().num_regions(), 1);
}

//! MMIO instruction emulator (filled in below).

//! vCPU state save/restore (filled in below).

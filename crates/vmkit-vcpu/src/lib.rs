//! Hypervisor-neutral vCPU and VM traits, a VmExit model, an exit dispatcher and a KVM backend.

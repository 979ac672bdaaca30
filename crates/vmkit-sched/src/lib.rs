//! A two-level vCPU scheduler: VMs share host CPUs by weight and cap, vCPUs share their VM.

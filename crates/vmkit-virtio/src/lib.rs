//! Virtio devices (block, net, console, rng) and the virtio-mmio transport.

//! vmkit virtio devices served as vhost-user backends.

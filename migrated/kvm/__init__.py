"""The thin typed KVM layer: the only code that issues KVM ioctls."""

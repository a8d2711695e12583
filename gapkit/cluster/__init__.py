"""Many nodes at once: the inventory, runners (SSH), fan-out, `cluster check`, `cluster status`."""

"""Projects, their environments and public keys, and dashboard tokens."""

"""What devices call: the update check (the hot path) and bundle downloads."""

"""Bundles: upload, list, activate, mandatory, delete, and zip validation."""

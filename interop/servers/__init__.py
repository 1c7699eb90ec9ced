"""Launchers of real SMTP servers for the interop suite; the interface is in ``base``."""

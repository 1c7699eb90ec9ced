"""The interop suite: dispatcher's SMTP client and worker against real SMTP servers (see README.md)."""

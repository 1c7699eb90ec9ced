"""Development tools, not part of the runtime: the recording SMTP sink and ``make demo``."""

"""The mail itself: addresses, every field and header check (``fields``), the ``Mail`` model (``message``),
its MIME bytes (``mime``)."""

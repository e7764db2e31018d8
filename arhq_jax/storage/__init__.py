"""Files on disk: atomic writes (nothing is left half-written), names read from files kept
inside their directory (``paths``), JSON parsed with a nesting limit (``jsonio``).

Imports nothing of the library.
"""

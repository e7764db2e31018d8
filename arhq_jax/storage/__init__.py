"""Files on disk: atomic writes (nothing is left half-written).

Imports nothing of the library.
"""

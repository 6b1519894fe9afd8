"""cas: a content-addressed, deduplicating, encrypted store for model files.

The Python API mirrors the command line: open or create a `Repository`, take
snapshots with `Archiver`, restore them with `Restorer`, verify with
`check_repository`. Every error is a subclass of `CasError`.
"""

from __future__ import annotations

__version__ = "0.1.0"

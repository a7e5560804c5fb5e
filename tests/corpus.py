"""The real corpus tests read: the Python standard library's own sources, present on every machine."""

import sysconfig
from pathlib import Path

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def stdlib_subset_inputs() -> dict:
    """PreprocessConfig inputs for the 29 top-level stdlib modules starting with a-c (~170k tokens)."""
    return {"inputs": [str(STDLIB)], "pattern": "[a-c]*.py"}

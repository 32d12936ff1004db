"""Child-process entry: ``python -m bench._child SPEC.json`` (started by :mod:`bench._harness`)."""

from __future__ import annotations

import sys

from bench._harness import child_main

if __name__ == "__main__":
    child_main(sys.argv[1])

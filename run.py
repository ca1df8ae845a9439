#!/usr/bin/env python
"""The only entry point: ``python run.py {info,bench} ...`` (see README.md)."""
import sys

from hybrid_reid.cli import main

if __name__ == "__main__":
    sys.exit(main())

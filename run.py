#!/usr/bin/env python3
"""Flywheel gear entry point (/flywheel/v0/run.py). Locally: `python run.py --root GEAR_FOLDER`."""
import sys

from pedseg.gear.main import main

if __name__ == "__main__":  # nnU-Net may spawn worker processes: keep the entry point guarded
    sys.exit(main())

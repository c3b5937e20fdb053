#!/usr/bin/env python3
"""Write unconditional samples with GPT-2. Flags: see docs/commands.md or --help."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))

from gpt2.cli import unconditional_main  # noqa: E402

if __name__ == "__main__":
    unconditional_main()

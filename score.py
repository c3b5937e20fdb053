#!/usr/bin/env python3
"""Score text files with GPT-2: tokens, nats per token, perplexity, bits per byte. Flags: see docs/commands.md or --help."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))

from gpt2.cli import score_main  # noqa: E402

if __name__ == "__main__":
    score_main()

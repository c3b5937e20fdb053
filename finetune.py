#!/usr/bin/env python3
"""Fine-tune GPT-2 on your own text: python finetune.py --dataset my.txt --run_name mine. Flags: docs/commands.md or --help."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))

from gpt2.cli import finetune_main  # noqa: E402

if __name__ == "__main__":
    finetune_main()

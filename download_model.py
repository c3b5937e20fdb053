#!/usr/bin/env python3
"""Fetch GPT-2 models: python download_model.py 124M [355M ...] [--models_dir DIR] [--base_url URL]."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))

from gpt2.cli import download_main  # noqa: E402

if __name__ == "__main__":
    download_main()

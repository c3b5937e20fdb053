#!/usr/bin/env python3
"""Serve GPT-2 over HTTP with OpenAI's completions API. Flags: see docs/server.md or --help."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))

from gpt2.cli import serve_main  # noqa: E402

if __name__ == "__main__":
    serve_main()

#!/usr/bin/env python3
"""Score or generate a whole corpus on Apache Beam: python pipeline.py score --input 'docs/*.txt' --output out/scores.
Flags: docs/pipeline.md or --help; every other flag is a Beam pipeline option (--runner, ...)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))

from gpt2.cli import pipeline_main  # noqa: E402

if __name__ == "__main__":
    pipeline_main()

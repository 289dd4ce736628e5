"""Hugging Face Spaces entry point (``app_file``): serves the app on 0.0.0.0:7860."""

import sys

from app.main import main

sys.exit(main(["--host", "0.0.0.0", "--port", "7860"]))

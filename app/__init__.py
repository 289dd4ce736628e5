"""The Gradio demo over trained adapters: ``python -m app``."""

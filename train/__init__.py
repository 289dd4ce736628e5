"""Training scripts that produce adapter files: R-Adapter, DRM and the baselines (``python -m train``)."""

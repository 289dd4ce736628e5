# radapter demo: serves the Gradio app on 0.0.0.0:7860 as a non-root user (Hugging Face Docker
# Spaces run containers as uid 1000 and expect app_port 7860).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    GRADIO_ANALYTICS_ENABLED=False \
    HF_HUB_OFFLINE=1 \
    GRADIO_SERVER_NAME=0.0.0.0 \
    GRADIO_SERVER_PORT=7860

# npm fetches the emoji packages the retrieval collection is built from (a package registry, not a hub).
RUN apt-get update && apt-get install -y --no-install-recommends npm && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 1000 user
WORKDIR /home/user/app

# The package with its [app] extra (pyproject.toml), editable: the app serves the adapters/ folder beside it.
COPY --chown=user . .
RUN pip install -e ".[app]"
USER user
ENV RADAPTER_DATA=/home/user/.cache/radapter/data RADAPTER_INDEXES=/home/user/.cache/radapter/indexes
RUN python -m radapter.data.prepare emoji segmentation emoji-backgrounds

EXPOSE 7860
CMD ["radapter-app", "--host", "0.0.0.0", "--port", "7860"]

# radapter: runs README command 1 (the main job) as a non-root user.
# Hugging Face Docker Spaces run containers as uid 1000 and expect port 7860 once the app exists.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    GRADIO_ANALYTICS_ENABLED=False \
    HF_HUB_OFFLINE=1

RUN useradd --create-home --uid 1000 user
WORKDIR /home/user/app

COPY requirements.txt .
RUN pip install -r requirements.txt

COPY --chown=user . .
USER user

EXPOSE 7860
CMD ["python", "-m", "radapter", "demo", "--out", "/tmp/radapter-demo"]

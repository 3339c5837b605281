# syntax=docker/dockerfile:1
# Multi-stage: the service image carries no torch; the trainer image adds it.
#   docker build --target service -t maskserve-service .
#   docker build --target trainer -t maskserve-trainer .
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY service ./service
COPY client ./client
COPY trainer ./trainer

FROM base AS service
RUN pip install ".[service]"
RUN useradd --create-home --uid 1000 maskserve
USER maskserve
EXPOSE 8000
HEALTHCHECK --interval=5s --timeout=3s --retries=20 \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz').status != 200)"
CMD ["maskserve", "serve", "--host", "0.0.0.0", "--port", "8000"]

FROM base AS trainer
# torch is pinned by the [trainer] extra; TORCH_INDEX_URL picks the build
# (default: PyPI's, CUDA-enabled; https://download.pytorch.org/whl/cpu for a small CPU image).
ARG TORCH_INDEX_URL=https://pypi.org/simple
RUN pip install --extra-index-url "${TORCH_INDEX_URL}" ".[trainer]"
RUN useradd --create-home --uid 1000 maskserve
USER maskserve
CMD ["python", "-m", "trainer", "--help"]

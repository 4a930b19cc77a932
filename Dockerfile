# dmc service image: the API (`dmc serve`) and the worker (`dmc worker`) run from it.
#   CPU:  docker build -t dmc .
#   CUDA: docker build -t dmc:cuda --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130 .
# Weights are not baked in: the model comes from DMC_BACKBONE_* settings and is cached in
# the /data volume (open_clip tags download on first use where a hub is reachable).
FROM python:3.11-slim AS base

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    DMC_MODEL_CACHE_DIR=/data/models \
    DMC_OBJECTS_DIR=/data/objects

RUN apt-get update \
    && apt-get install -y --no-install-recommends curl \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# Torch first, from the index that matches the build (CPU or a CUDA version): the largest layer.
RUN pip install --index-url "${TORCH_INDEX_URL}" torch==2.14.1 torchvision==0.29.1
COPY pyproject.toml README.md alembic.ini ./
COPY dmc_core ./dmc_core
COPY store ./store
COPY worker ./worker
COPY server ./server
COPY migrations ./migrations
COPY dmc_cli ./dmc_cli
RUN pip install ".[standin,service]"

RUN useradd --create-home --uid 1000 dmc && mkdir -p /data && chown dmc /data
USER dmc
VOLUME ["/data"]
EXPOSE 8000
CMD ["dmc", "serve", "--host", "0.0.0.0", "--port", "8000"]

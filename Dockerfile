# alignd: one image for every process (API, Celery worker, beat, Flower); the command picks the role.
#   docker build -t alignd .
#   docker compose -f deploy/docker-compose.yml up
# CPU build by default; for a GPU train worker build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    ALIGND_HOME=/data \
    ALIGND_HOST=0.0.0.0

WORKDIR /app
RUN pip install --index-url ${TORCH_INDEX} "torch>=2.4,<2.15"
COPY pyproject.toml README.md* ./
COPY alignd ./alignd
COPY core ./core
COPY training ./training
COPY store ./store
COPY service ./service
COPY workers ./workers
RUN pip install .

RUN useradd --create-home --uid 1000 alignd && mkdir -p /data && chown alignd /data
USER alignd
# checkpoints, reward models, PPO state and generated keys live here; share it between every container. The registry
# names checkpoints relative to /data/checkpoints, so a backup of the volume restores under any path (deploy/README.md)
# (declared after the chown: changes to a volume path after VOLUME are discarded)
VOLUME /data
EXPOSE 8000 5555
CMD ["alignd", "serve"]

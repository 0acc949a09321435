# OpenAI-compatible server for tri-mode diffusion LMs (nld-server), CUDA build.
#
#   docker build -t nld-server .
#   docker run --gpus all -p 8000:8000 nld-server                      # embedded model
#   docker run --gpus all -p 8000:8000 -v /path/to/model:/models:ro nld-server
#
# torch/triton come from the base image: pyproject.toml pins torch==2.13.0 and
# triton==3.7.1 for the development venv, and the default base ships that torch (with the
# triton its wheel depends on). The package is installed with --no-deps and the other
# runtime dependencies are read from pyproject.toml, so a different BASE_IMAGE (another
# CUDA version) never makes pip download a second torch. See docs/deployment.md.
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime
FROM ${BASE_IMAGE}

LABEL org.opencontainers.image.title="nld-server" \
      org.opencontainers.image.description="OpenAI-compatible server for tri-mode (ar / diffusion / self_spec) diffusion language models" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Runtime dependencies except torch/triton (own layer: rebuilt only when pyproject.toml changes).
COPY pyproject.toml /tmp/nld-build/pyproject.toml
COPY deploy/pyproject_deps.py /opt/nld/pyproject_deps.py
RUN python /opt/nld/pyproject_deps.py /tmp/nld-build/pyproject.toml --exclude torch triton > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The package itself (server/ includes the embedded default model as package data).
COPY server /tmp/nld-build/server
COPY kernels /tmp/nld-build/kernels
RUN pip install --no-cache-dir --no-deps /tmp/nld-build \
    && rm -rf /tmp/nld-build \
    && python -c "import torch, triton, server, kernels; print('torch', torch.__version__, 'triton', triton.__version__)"

COPY --chmod=755 deploy/entrypoint.sh /opt/nld/entrypoint.sh
COPY deploy/healthcheck.py /opt/nld/healthcheck.py
# Serving presets (select one with NLD_CONFIG=/opt/nld/configs/NAME.yaml).
COPY configs /opt/nld/configs

# Unprivileged user; /models is the mount point of an external model folder.
RUN groupadd --gid 10001 nld \
    && useradd --create-home --uid 10001 --gid 10001 --shell /bin/bash nld \
    && mkdir -p /models \
    && chown 10001:10001 /models

ENV NLD_HOST=0.0.0.0 \
    NLD_PORT=8000 \
    NLD_MODEL_DIR=/models \
    HF_HOME=/home/nld/.cache/huggingface \
    HF_HUB_OFFLINE=1 \
    TRITON_CACHE_DIR=/home/nld/.triton/cache

USER 10001:10001
WORKDIR /home/nld
EXPOSE 8000

# /ready turns 200 once the model is loaded and the engine loop runs; allow time for the
# load and the first Triton compilation.
HEALTHCHECK --interval=15s --timeout=10s --start-period=300s --retries=3 \
    CMD ["python", "/opt/nld/healthcheck.py"]

ENTRYPOINT ["/opt/nld/entrypoint.sh"]
CMD []

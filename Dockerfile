# curvscope server image.
#
#   CPU:  docker build -t curvscope:cpu .
#   CUDA: docker build --build-arg TORCH_VARIANT=cu128 -t curvscope:cu128 .
#
# TORCH_VARIANT names a wheel index of download.pytorch.org/whl (cpu, cu126, cu128, ...);
# TORCH_INDEX_URL replaces that index (a mirror, or a local one: scripts/image_smoke.sh). CUDA
# wheels carry their own CUDA runtime, so one slim base serves both; the node needs only the
# NVIDIA driver and container toolkit. The image runs as UID 10001 on a read-only root
# filesystem: the blob store is a volume at /var/lib/curvscope and /tmp an emptyDir.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu
# Where torch and its dependencies come from: a PEP 503 index holding torch==TORCH_VERSION.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/curvscope
ENV PATH=/opt/curvscope/bin:$PATH
# torch first and from its own index, so the CPU image does not pull CUDA wheels from PyPI.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY client/ client/
COPY pyproject.toml README.md ./
COPY service/ service/
# compileall skips torch's test helpers written for newer Pythons (py312_intrinsics.py: a
# SyntaxError on 3.11 that would fail the build). The hf extra (transformers) loads Hugging Face
# checkpoint folders.
RUN pip install --no-cache-dir ./client "./[hf]" \
    && python -m compileall -q -x '/torch/testing/_internal/py3[0-9]+_' /opt/curvscope/lib \
    && python -c "import torch, curvscope_service, curvscope; print('torch', torch.__version__)"

FROM ${PYTHON_IMAGE} AS runtime
ARG TORCH_VARIANT=cpu
LABEL org.opencontainers.image.title="curvscope" \
      org.opencontainers.image.description="Curvature analysis of model checkpoints over gRPC" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.curvscope.torch-variant="${TORCH_VARIANT}"
RUN groupadd --system --gid 10001 curvscope \
    && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin curvscope \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/curvscope
COPY --from=build /opt/curvscope /opt/curvscope
# Everything that writes goes to the store volume or to /tmp: HOME and the caches point there,
# bytecode was compiled at build time.
ENV PATH=/opt/curvscope/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor \
    TRITON_CACHE_DIR=/tmp/triton \
    HF_HUB_OFFLINE=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    CURVSCOPE_HOST=[::] \
    CURVSCOPE_PORT=50051 \
    CURVSCOPE_METRICS_PORT=9090 \
    CURVSCOPE_STORE=/var/lib/curvscope/store
VOLUME ["/var/lib/curvscope"]
WORKDIR /tmp
USER 10001:10001
EXPOSE 50051 9090
STOPSIGNAL SIGTERM
ENTRYPOINT ["curvscope", "serve"]

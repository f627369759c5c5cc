# syntax=docker/dockerfile:1
# pedseg Flywheel gear image. One file, two variants. Bakes in bundles/captk-deepmedic-brats (the default, a real
# model) and bundles/pedseg-demo (for `pedseg demo`; scripts/train_demo_bundle.py):
#   docker build -t pedseg/brain-tumor:0.1.0 .                                  NVIDIA hosts (default)
#   docker build --build-arg VARIANT=cpu -t pedseg/brain-tumor:0.1.0-cpu .      CPU only
# Another bundle: the gear's model_bundle input, or mount it and set PEDSEG_BUNDLE (see README).
ARG VARIANT=gpu
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.8.4
ARG TORCH_VERSION=2.13.0
ARG TORCHVISION_VERSION=0.28.0

FROM ${UV_IMAGE} AS uv

# NVIDIA hosts: the CUDA base brings the NVIDIA container runtime's settings and driver check; torch's
# wheels bring the CUDA libraries themselves. Ubuntu 24.04's Python is 3.12 and pedseg needs 3.11, so uv
# (pinned above) installs a standalone CPython 3.11, linked where the CPU variant has its python3.11.
FROM ${CUDA_IMAGE} AS base-gpu
COPY --from=uv /uv /usr/local/bin/uv
# Ubuntu's own user holds uid 1000, which the gear user takes below.
RUN UV_PYTHON_INSTALL_DIR=/opt/python uv python install 3.11 \
    && ln -s "$(UV_PYTHON_INSTALL_DIR=/opt/python uv python find 3.11)" /usr/local/bin/python3.11 \
    && if id ubuntu >/dev/null 2>&1; then userdel ubuntu && rm -rf /home/ubuntu; fi

FROM ${PYTHON_IMAGE} AS base-cpu

# base-gpu or base-cpu above, not an image to tag.
# hadolint ignore=DL3006
FROM base-${VARIANT} AS runtime
# Keep in step with manifest.json "environment": the engine may run the gear with either (a test checks).
ENV FLYWHEEL=/flywheel/v0 \
    PEDSEG_BUNDLE=/opt/pedseg/bundles/captk-deepmedic-brats \
    PEDSEG_DEMO_BUNDLE=/opt/pedseg/bundles/pedseg-demo \
    nnUNet_raw=/flywheel/v0/work/nnUNet_raw \
    nnUNet_preprocessed=/flywheel/v0/work/nnUNet_preprocessed \
    nnUNet_results=/flywheel/v0/work/nnUNet_results \
    OMP_NUM_THREADS=1 \
    MKL_NUM_THREADS=1 \
    OPENBLAS_NUM_THREADS=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    PYTHONUNBUFFERED=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

# libgomp1: OpenMP runtime for SimpleITK/scikit-image wheels that do not vendor it. Not version-pinned:
# Debian and Ubuntu drop superseded versions from their archives (security updates), which would break rebuilds.
# The engine mounts input/, output/ and work/ under /flywheel/v0; a non-root user owns them for local `docker run`.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 1000 --create-home --shell /usr/sbin/nologin pedseg \
    && mkdir -p /flywheel/v0/input /flywheel/v0/output /flywheel/v0/work \
    && chown -R pedseg:pedseg /flywheel/v0

FROM runtime AS venv
ARG VARIANT
ARG TORCH_VERSION
ARG TORCHVISION_VERSION
# torch first, pinned: CUDA wheels from PyPI for NVIDIA hosts, CPU-only wheels (no CUDA libraries) otherwise.
RUN python3.11 -m venv /opt/venv \
    && if [ "${VARIANT}" = cpu ]; then \
        pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu \
            "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"; \
    else \
        pip install --no-cache-dir "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"; \
    fi
WORKDIR /src
# The whole source (.dockerignore leaves out tests, bundles, caches), so new packages need no edit here.
COPY . ./
# constraints-cpu.txt pins torch's version: the torch installed above stays, whichever variant it is.
# The "gear" extra adds the Flywheel SDK, used only in session mode (no 'dicom' input).
RUN pip install --no-cache-dir -c constraints-cpu.txt ".[gear]"

FROM runtime
COPY --from=venv /opt/venv /opt/venv
COPY bundles/captk-deepmedic-brats /opt/pedseg/bundles/captk-deepmedic-brats
COPY bundles/pedseg-demo /opt/pedseg/bundles/pedseg-demo
WORKDIR /flywheel/v0
COPY --chown=pedseg:pedseg manifest.json run.py ./
USER 1000:1000
CMD ["python3", "/flywheel/v0/run.py"]

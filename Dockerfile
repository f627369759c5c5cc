# syntax=docker/dockerfile:1
# pedseg Flywheel gear image. One file, two variants. Needs bundles/pedseg-demo (scripts/train_demo_bundle.py):
#   docker build -t pedseg/brain-tumor:0.1.0 .                                  NVIDIA hosts (default)
#   docker build --build-arg VARIANT=cpu -t pedseg/brain-tumor:0.1.0-cpu .      CPU only
# The GPU variant needs no CUDA base image: PyPI's torch wheels bring the CUDA runtime and cuDNN as
# nvidia-* wheels, and the nvidia/cuda Ubuntu 22.04 images ship Python 3.10 where pedseg needs 3.11.
# The host needs only the NVIDIA driver and the NVIDIA container toolkit.
ARG VARIANT=gpu
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS runtime
# Keep in step with manifest.json "environment": the engine may run the gear with either (a test checks).
ENV FLYWHEEL=/flywheel/v0 \
    PEDSEG_BUNDLE=/opt/pedseg/bundles/pedseg-demo \
    nnUNet_raw=/flywheel/v0/work/nnUNet_raw \
    nnUNet_preprocessed=/flywheel/v0/work/nnUNet_preprocessed \
    nnUNet_results=/flywheel/v0/work/nnUNet_results \
    OMP_NUM_THREADS=1 \
    MKL_NUM_THREADS=1 \
    OPENBLAS_NUM_THREADS=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

# libgomp1: OpenMP runtime for SimpleITK/scikit-image wheels that do not vendor it. Not version-pinned:
# Debian drops superseded versions from its archive (security updates), which would break rebuilds.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/*

FROM runtime AS torch-cpu
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 torchvision==0.28.0

FROM runtime AS torch-gpu
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir torch==2.13.0 torchvision==0.28.0

# torch-cpu or torch-gpu above, not an image to tag.
# hadolint ignore=DL3006
FROM torch-${VARIANT} AS venv
WORKDIR /src
COPY pyproject.toml README.md constraints-cpu.txt ./
COPY pipeline ./pipeline
COPY reporting ./reporting
COPY gear ./gear
COPY synth ./synth
COPY cli ./cli
# constraints-cpu.txt pins torch's version: the torch installed above stays, whichever variant it is.
# The "gear" extra adds the Flywheel SDK, used only in session mode (no 'dicom' input).
RUN pip install --no-cache-dir -c constraints-cpu.txt ".[gear]"

FROM runtime
COPY --from=venv /opt/venv /opt/venv
COPY bundles/pedseg-demo /opt/pedseg/bundles/pedseg-demo
# The engine mounts input/, output/ and work/ here; a non-root user owns them for local `docker run`.
RUN useradd --uid 1000 --create-home --shell /usr/sbin/nologin pedseg \
    && mkdir -p /flywheel/v0/input /flywheel/v0/output /flywheel/v0/work \
    && chown -R pedseg:pedseg /flywheel/v0
WORKDIR /flywheel/v0
COPY --chown=pedseg:pedseg manifest.json run.py ./
USER 1000:1000
CMD ["python3", "/flywheel/v0/run.py"]

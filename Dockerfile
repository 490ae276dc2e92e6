# batchgen image for both roles on Kubernetes: the controller (`batchgen submit --wait`, the chart's Job) and the
# workers (`python -m batchgen.launch.k8s.torchrun ... batchgen worker`, the PyTorchJobs).
#
#   docker build -t ghcr.io/batchgen/batchgen:0.1.0 .
#   docker build --build-arg FLASH_ATTN=require -t ghcr.io/batchgen/batchgen:0.1.0-fa .   # fail without flash-attn
#
# Pinned: the CUDA PyTorch base by tag (pin it by digest too in your registry mirror: BASE_IMAGE=...@sha256:...),
# every Python dependency by docker/constraints.txt, torch by the base image's own build, flash-attn by version.

ARG BASE_IMAGE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

# flash-attn publishes prebuilt wheels per (flash-attn, CUDA major, torch minor, C++ ABI, Python); building it from
# source takes hours and needs nvcc. auto: install the matching wheel when the release has one, else go on without
# it (the native sequence-parallel backend uses PyTorch SDPA and needs none). require: fail instead. skip: never.
ARG FLASH_ATTN=auto
ARG FLASH_ATTN_VERSION=2.8.3

LABEL org.opencontainers.image.title="batchgen" \
      org.opencontainers.image.description="Batch video generation with Mochi 1 on Kubernetes (controller and workers)" \
      org.opencontainers.image.licenses="Apache-2.0"

# HOME and caches point at /tmp: pods run with a read-only root filesystem and an emptyDir there.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp \
    HF_HUB_OFFLINE=1

WORKDIR /opt/batchgen

# Dependencies first, in their own layer, so code changes rebuild in seconds. Naming torch at the base image's
# version makes pip fail loudly rather than replace the CUDA build with another download.
COPY docker/constraints.txt docker/constraints.txt
COPY pyproject.toml README.m[d] ./
RUN set -eu; \
    torch_version="$(python -c 'import torch; print(torch.__version__)')"; \
    python -c 'import tomllib; deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]; open("/tmp/requirements.txt", "w").write("\n".join(d for d in deps if not d.startswith("torch")) + "\n")'; \
    pip install --constraint docker/constraints.txt "torch==${torch_version}" --requirement /tmp/requirements.txt; \
    rm /tmp/requirements.txt

RUN set -eu; \
    if [ "${FLASH_ATTN}" = skip ]; then exit 0; fi; \
    wheel="$(python -c 'import sys, torch; \
torch_minor = ".".join(torch.__version__.split("+")[0].split(".")[:2]); \
cuda_major = torch.version.cuda.split(".")[0]; \
abi = "TRUE" if torch._C._GLIBCXX_USE_CXX11_ABI else "FALSE"; \
py = f"cp{sys.version_info.major}{sys.version_info.minor}"; \
v = sys.argv[1]; \
print(f"https://github.com/Dao-AILab/flash-attention/releases/download/v{v}/flash_attn-{v}+cu{cuda_major}torch{torch_minor}cxx11abi{abi}-{py}-{py}-linux_x86_64.whl")' "${FLASH_ATTN_VERSION}")"; \
    if pip install --constraint docker/constraints.txt --no-deps "${wheel}" einops; then \
        python -c 'import flash_attn; print("flash-attn", flash_attn.__version__)'; \
    elif [ "${FLASH_ATTN}" = require ]; then \
        echo "no flash-attn wheel at ${wheel}" >&2; exit 1; \
    else \
        echo "flash-attn: no prebuilt wheel for this torch/CUDA/Python (${wheel}); continuing without it" >&2; \
    fi

# The package itself, without touching the pinned dependencies; bytecode compiled now because the root
# filesystem is read-only at run time.
COPY batchgen batchgen
RUN pip install --no-deps . \
    && python -m compileall -q "$(python -c 'import batchgen, os; print(os.path.dirname(batchgen.__file__))')" \
    && batchgen --version \
    && python -c 'import batchgen.launch.k8s.pytorchjob, batchgen.launch.k8s.trainjob, batchgen.launch.k8s.torchrun, batchgen.launch.k8s.fetch'

# Non-root at run time, by number so Kubernetes can verify runAsNonRoot (the chart and the rendered PyTorchJobs
# run as 1000:1000). The base image may already have a user 1000; then that one is used.
RUN set -eu; \
    getent group 1000 >/dev/null || groupadd --gid 1000 batchgen; \
    getent passwd 1000 >/dev/null || \
        useradd --uid 1000 --gid 1000 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin batchgen
USER 1000:1000
WORKDIR /tmp

# The chart's controller passes only arguments (`submit ...`); the PyTorchJobs override the command with
# `python -m batchgen.launch.k8s.torchrun`.
ENTRYPOINT ["batchgen"]
CMD ["--help"]

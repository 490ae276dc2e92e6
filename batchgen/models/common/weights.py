"""Reading a model directory without loading it, shared by every family: required folders and files, weight
files and their bf16 variant, safetensors headers and completeness, JSON configs, the weights' fingerprint, and the
dtype/device arguments the loaders pass to diffusers and transformers. No torch at import time: the control plane
fingerprints weights and detects families with these."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

from batchgen.core.errors import InputError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")


BF16_VARIANT = "bf16"


def refuse_config_without_weights(path: Path) -> None:
    """A diffusers ``transformer/`` folder with its config but no weights is named as such, not as an unknown
    layout (an interrupted download)."""
    if (path / "transformer" / "config.json").is_file():
        raise InputError(
            f"{path / 'transformer'}: config.json but no weight file (diffusion_pytorch_model*.safetensors)"
        )


def require_dir(model_dir: str | Path) -> Path:
    path = Path(model_dir)
    if not path.exists():
        raise InputError(f"model directory {path} does not exist")
    if not path.is_dir():
        raise InputError(f"model directory {path} is not a directory")
    return path


def weight_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def read_safetensors_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor names, dtypes, shapes) without reading tensor data."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise InputError(f"{path}: not a safetensors file (shorter than its header length)")
            (length,) = struct.unpack("<Q", raw)
            if length > 100_000_000:
                raise InputError(f"{path}: not a safetensors file (implausible header length {length})")
            header = json.loads(f.read(length))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: cannot read safetensors header: {e}") from None
    header.pop("__metadata__", None)
    return header


def check_safetensors_complete(path: Path) -> None:
    """InputError naming ``path`` when the file ends before its last tensor's data (an interrupted download): the
    libraries loading it fail with errors that name neither the file nor the cause."""
    header = read_safetensors_header(path)
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
    try:
        needed = 8 + length + max((int(t["data_offsets"][1]) for t in header.values()), default=0)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise InputError(f"{path}: not a safetensors file (bad tensor entry: {e})") from None
    size = path.stat().st_size
    if size < needed:
        raise InputError(f"{path}: truncated safetensors file ({size} bytes, its header needs {needed})")


def read_json_object(path: Path, *, required: bool = False) -> dict[str, Any]:
    """The JSON object in ``path``: {} when the file is absent (InputError when ``required``), InputError naming
    the file when it is not a JSON object."""
    if not path.is_file():
        if required:
            raise InputError(f"{path}: missing")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object")
    return data


_HEAD_BYTES = 1 << 16


def fingerprint_model_dir(model_dir: str | Path) -> str:
    """sha256 over every file's relative path and size, config files in full, and the first and last 64 KiB of
    each weight file. Cheap for a 60 GB model, yet two random initialisations of one architecture differ."""
    path = require_dir(model_dir)
    digest = hashlib.sha256()
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise InputError(f"model directory {path} is empty")
    for file in files:
        relative = file.relative_to(path).as_posix()
        size = file.stat().st_size
        digest.update(f"{relative}\0{size}\0".encode())
        with open(file, "rb") as f:
            if not file.name.endswith(WEIGHT_SUFFIXES) and size <= 4 * _HEAD_BYTES:
                digest.update(f.read())
                continue
            digest.update(f.read(_HEAD_BYTES))
            if size > 2 * _HEAD_BYTES:
                f.seek(size - _HEAD_BYTES)
                digest.update(f.read(_HEAD_BYTES))
    return digest.hexdigest()


def resolve_dtype(dtype: Any, device: Any):
    """'auto' -> bf16 on CUDA, fp32 elsewhere (CPU bf16 matmuls are slow and the tests compare against fp32)."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in names:
        raise InputError(f"dtype must be one of auto, bf16, fp32, got {dtype!r}")
    return names[dtype]


def variant_for(folder: Path, dtype) -> str | None:
    """Use the bf16 variant when loading in bf16 (half the bytes to read), or when it is all there is."""
    import torch

    files = weight_files(folder)
    variant = [p for p in files if f".{BF16_VARIANT}." in p.name]
    plain = [p for p in files if p not in variant]
    if variant and (dtype == torch.bfloat16 or not plain):
        return BF16_VARIANT
    return None


def require(path: Path, what: str) -> None:
    if not path.exists():
        raise InputError(f"{path}: missing ({what})")


def transformers_dtype_kwarg(dtype) -> dict[str, Any]:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def device_map(device) -> dict[str, Any]:
    import torch

    device = torch.device(device)
    # Straight into GPU memory, tensor by tensor: no host copy of the full model per rank.
    return {"device_map": {"": str(device)}} if device.type == "cuda" else {}


def quiet_progress_bars() -> None:
    # Per-shard "Loading weights" bars would interleave with the worker's own progress output.
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()

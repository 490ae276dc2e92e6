"""What every family's tiny random model shares: the marker file, a fresh directory, the offline tokenizer and the
seeded parameter fill. The tiny models themselves are ``models/<family>/tiny.py``."""

from __future__ import annotations

import string
from pathlib import Path

TINY_TOML_NAME = "batchgen-tiny.toml"


def tokenizer_vocab() -> list[tuple[str, float]]:
    """A small SentencePiece-style unigram vocabulary: T5's special tokens first (pad 0, eos 1, unk 2), then
    word-initial and inner pieces for letters and digits, then some whole words, so ordinary prompts tokenize
    into several tokens and unknown characters into <unk>."""
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    for ch in string.ascii_lowercase + string.digits + ".,!?'-":
        pieces.append((ch, -5.0))
        pieces.append(("\u2581" + ch, -5.5))
    for word in (
        "a the of and in on with at to is cat dog bird fish car tree sky sea city night day sun moon red blue "
        "green white black close up slow motion video camera walking running flying water fire snow forest"
    ).split():
        pieces.append(("\u2581" + word, -3.0))
    return pieces


def fresh_directory(directory: str | Path) -> Path:
    """``directory``, created if missing; InputError if it holds anything (a tiny model never overwrites)."""
    from batchgen.core.errors import InputError

    root = Path(directory)
    if root.exists() and any(root.iterdir()):
        raise InputError(f"{root}: directory is not empty; the tiny model needs a fresh directory")
    root.mkdir(parents=True, exist_ok=True)
    return root


def write_tokenizer(path: Path, *, model_max_length: int = 256) -> int:
    from transformers import T5TokenizerFast  # type: ignore[attr-defined]  # a run-time alias in transformers 5

    tokenizer = T5TokenizerFast(vocab=tokenizer_vocab(), extra_ids=0, model_max_length=model_max_length)
    tokenizer.save_pretrained(str(path))
    return len(tokenizer)


def randomize_parameters(module, generator) -> None:
    """Fill every parameter from ``generator`` (on the parameters' device): fan-in scaled normals for matrices
    and convolutions (activations stay O(1) through many layers), gains near 1 for norms, small biases, and
    RoPE frequencies that visibly rotate neighbouring positions. Explicit values instead of each class's default
    init: deterministic across library versions, and nothing zero-initialised (pos_frequencies, adaLN) that
    would hide a bug in RoPE or modulation handling."""
    import torch

    with torch.no_grad():
        for name, param in sorted(module.named_parameters()):
            values = torch.randn(param.shape, generator=generator, dtype=torch.float32, device=param.device)
            if name == "pos_frequencies":
                values = values.abs() * 0.25
            elif param.ndim > 1:
                values = values / param[0].numel() ** 0.5
            elif ("norm" in name and name.endswith("weight")) or name.endswith(".gamma"):
                # .gamma: the gains of the Wan VAE's RMS norms
                values = 1.0 + 0.1 * values
            else:
                values = values * 0.02
            param.copy_(values)

"""GGUF files as models: a `.gguf` given as `--model` is dequantized once into an ordinary checkpoint.

transformers reads GGUF (with the `gguf` package) and dequantizes every tensor to the dtype asked for;
the result is saved with its tokenizer (the chat template included) under the cache folder,
`$XDG_CACHE_HOME/ulsexport/gguf/<sha256 of the file, 16 digits>/`, written whole or not at all, so
every later run opens the plain checkpoint. The quantization config is dropped: the saved weights are
ordinary fp32 tensors, and what the quantization lost stays lost.
"""
from __future__ import annotations

import os
from pathlib import Path

from .artifact import Artifact, file_sha256, write_manifest
from .errors import UserError
from .outputs import atomic_output_dir

SUFFIX = ".gguf"


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ulsexport" / "gguf"


def checkpoint_from_gguf(path: str | Path, quiet: bool = True) -> Path:
    """The cached ordinary checkpoint of a GGUF file, made on first use."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    digest = file_sha256(path)
    out = cache_root() / digest[:16]
    if _converted(out, digest):
        return out
    try:
        import gguf  # noqa: F401
        import accelerate  # noqa: F401
    except ImportError:
        raise UserError(f"{path} is a GGUF file; reading one needs `gguf` and `accelerate`: "
                        "pip install 'ulsexport[gguf]'") from None
    if not quiet:
        print(f"dequantizing {path.name} into {out} (once; later runs reuse it)", flush=True)
    try:
        with atomic_output_dir(out, force=True) as tmp:
            _convert(path, tmp)
            write_manifest(tmp, {"kind": "hf-checkpoint",
                                 "converted_from_gguf": {"file": path.name, "sha256": digest}})
    except UserError:
        if _converted(out, digest):  # another process converted it meanwhile
            return out
        raise
    return out


def _converted(out: Path, digest: str) -> bool:
    converted = Artifact.open(out).get("converted_from_gguf") if (out / "config.json").is_file() else None
    return isinstance(converted, dict) and converted.get("sha256") == digest


def _convert(path: Path, tmp: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:  # transformers draws its own bar of the tensors dequantized: once per file, so it stays
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as exc:  # transformers raises many types for a file it cannot read
        raise UserError(f"could not read {path} as a GGUF model: {type(exc).__name__}: {exc}") from None
    # The weights are dequantized already: drop what marks the model as quantized, or it cannot be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)


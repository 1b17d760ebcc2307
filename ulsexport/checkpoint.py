"""Hugging Face checkpoints on disk: find them, read their config, stream their tensors, write shards.

Pruning reads only safetensors headers (names, dtypes, shapes, offsets), then writes each output
shard header first and copies every kept tensor's bytes from its source in bounded chunks: memory
stays flat whatever the model's size, and no tensor is ever decoded. Pickle sources (opt-in) go
through torch one tensor at a time.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from .errors import UserError

CONFIG_NAME = "config.json"
SAFE_INDEX_NAME = "model.safetensors.index.json"
PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".msgpack", ".h5", ".onnx", ".onnx_data", ".data")
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
COPY_CHUNK_BYTES = 64 * 1024**2

# safetensors dtype codes and their sizes in bytes.
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str          # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    source: Path
    data_offset: int | None = None   # where its bytes start in a safetensors source file

    @property
    def nbytes(self) -> int:
        n = DTYPE_SIZES[self.dtype]
        for d in self.shape:
            n *= d
        return n


def resolve_model_dir(path_or_id: str | Path) -> Path:
    """A local checkpoint directory, or a hub id downloaded to the local cache where reachable."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file():
            raise UserError(f"{path} has no {CONFIG_NAME}; it is not a Hugging Face checkpoint directory")
        return path
    if path.exists():
        raise UserError(f"{path} is a file; --model takes a checkpoint directory")
    text = str(path_or_id)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            local = snapshot_download(text, allow_patterns=["*.json", "*.safetensors", "*.model",
                                                            "*.txt", "*.jinja", "tokenizer*"])
        except Exception as exc:
            raise UserError(f"{text} is not a local directory and could not be fetched from the hub: "
                            f"{type(exc).__name__}") from None
        return Path(local)
    raise UserError(f"{path} does not exist")


def load_model_info(model: str | Path):
    """(directory, config, adapter) for a checkpoint, with the unsupported cases refused."""
    from .families import adapter_for

    model_dir = resolve_model_dir(model)
    config = read_config(model_dir)
    return model_dir, config, adapter_for(config)


def read_config(model_dir: Path) -> dict:
    try:
        return json.loads((Path(model_dir) / CONFIG_NAME).read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{model_dir}/{CONFIG_NAME} is not valid JSON: {exc}") from None


def weight_files(model_dir: Path, allow_pickle: bool = False) -> list[Path]:
    """The checkpoint's weight files, checked to exist, in shard order."""
    model_dir = Path(model_dir)
    for index_name in (SAFE_INDEX_NAME, PICKLE_INDEX_NAME):
        index = model_dir / index_name
        if index.is_file():
            if index_name == PICKLE_INDEX_NAME and not allow_pickle:
                raise _pickle_refused(model_dir)
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (model_dir / f).is_file()]
            if missing:
                raise UserError(f"{index} names shard {missing[0]}, which is not in {model_dir}")
            return [model_dir / f for f in files]
    safe = sorted(model_dir.glob("*.safetensors"))
    if safe:
        return safe
    pickles = sorted(model_dir.glob("pytorch_model*.bin"))
    if pickles:
        if not allow_pickle:
            raise _pickle_refused(model_dir)
        return pickles
    raise UserError(f"{model_dir} has no weights (*.safetensors, or pytorch_model*.bin)")


def _pickle_refused(model_dir: Path) -> UserError:
    return UserError(f"{model_dir} holds only pickle weights (*.bin), which can run code when loaded; "
                     "pass --allow-pickle if you trust them")


def tensor_infos(files: list[Path]) -> list[TensorInfo]:
    """Names, dtypes and shapes of every tensor, read from headers only."""
    infos = []
    for path in files:
        if path.suffix == ".safetensors":
            infos.extend(_safetensors_header(path))
        else:
            for name, tensor in _pickle_tensors(path):
                infos.append(TensorInfo(name, _torch_dtype_code(tensor.dtype), tuple(tensor.shape), path))
    return infos


def _safetensors_header(path: Path) -> list[TensorInfo]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise UserError(f"{path} is truncated (no safetensors header)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > size - 8:
            raise UserError(f"{path} is truncated or not a safetensors file")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{path} has a corrupt safetensors header") from None
    data_len = size - 8 - header_len
    infos = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        if end > data_len:
            raise UserError(f"{path} is truncated: tensor {name} ends past the end of the file")
        info = TensorInfo(name, entry["dtype"], tuple(entry["shape"]), path, 8 + header_len + begin)
        if info.nbytes != end - begin:
            raise UserError(f"{path}: tensor {name}'s size does not match its shape and dtype")
        infos.append(info)
    return infos


def _pickle_tensors(path: Path):
    import torch

    return torch.load(path, map_location="cpu", weights_only=True, mmap=True).items()


def _torch_dtype_code(dtype) -> str:
    import torch

    codes = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
             torch.uint8: "U8", torch.bool: "BOOL"}
    return codes[dtype]


def read_tensor(info: TensorInfo):
    """One tensor, loaded alone (memory-mapped for safetensors)."""
    if info.source.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(info.source, framework="pt") as f:
            return f.get_tensor(info.name)
    return dict(_pickle_tensors(info.source))[info.name]


def plan_shards(infos: list[TensorInfo], max_shard_bytes: int) -> list[list[TensorInfo]]:
    shards: list[list[TensorInfo]] = [[]]
    size = 0
    for info in infos:
        if shards[-1] and size + info.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(info)
        size += info.nbytes
    return shards


def write_safetensors_streaming(path: Path, entries: list[tuple[str, TensorInfo]],
                                on_tensor: Callable[[int], None] | None = None) -> None:
    """Write (output name, source tensor) pairs to one safetensors file: the header first, then
    each tensor's bytes copied from its source in bounded chunks, so memory stays flat."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, info in entries:
        header[name] = {"dtype": info.dtype, "shape": list(info.shape),
                        "data_offsets": [offset, offset + info.nbytes]}
        offset += info.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, info in entries:
            _copy_tensor_bytes(info, f)
            if on_tensor:
                on_tensor(info.nbytes)


def _copy_tensor_bytes(info: TensorInfo, out) -> None:
    if info.data_offset is None:  # pickle source: one tensor at a time through torch
        import torch

        tensor = read_tensor(info).contiguous()
        out.write(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        return
    out.flush()
    with open(info.source, "rb") as src:
        offset, left = info.data_offset, info.nbytes
        while left:
            copied = _copy_range(src, out, offset, min(left, COPY_CHUNK_BYTES))
            if not copied:
                raise UserError(f"{info.source} ended inside tensor {info.name}")
            offset += copied
            left -= copied


def _copy_range(src, out, offset: int, count: int) -> int:
    """Copy bytes in the kernel where it can (copy_file_range), else through a bounded buffer."""
    try:
        return os.copy_file_range(src.fileno(), out.fileno(), count, offset)
    except (AttributeError, OSError):
        src.seek(offset)
        chunk = src.read(count)
        out.write(chunk)
        out.flush()
        return len(chunk)


def write_sharded(out_dir: Path, entries: list[tuple[str, TensorInfo]],
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                  on_tensor: Callable[[int], None] | None = None) -> list[Path]:
    """Write tensors as `save_pretrained` lays them out: one file, or shards plus an index."""
    by_info = {id(info): name for name, info in entries}
    shards = plan_shards([info for _, info in entries], max_shard_bytes)
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for shard, filename in zip(shards, names):
        write_safetensors_streaming(out_dir / filename, [(by_info[id(i)], i) for i in shard], on_tensor)
        weight_map.update({by_info[id(i)]: filename for i in shard})
    if len(shards) > 1:
        total = sum(info.nbytes for _, info in entries)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / SAFE_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return [out_dir / n for n in names]


def copy_side_files(src: Path, dst: Path, skip: tuple[str, ...] = (CONFIG_NAME,)) -> list[str]:
    """Copy tokenizer files, generation config, chat templates, licences: every top-level file but weights."""
    copied = []
    for path in sorted(Path(src).iterdir()):
        if (not path.is_file() or path.name in skip or path.name.endswith(WEIGHT_SUFFIXES)
                or path.name in (SAFE_INDEX_NAME, PICKLE_INDEX_NAME, "ulsexport.json")):
            continue
        shutil.copy2(path, dst / path.name)
        copied.append(path.name)
    return copied


def materialized_per_layer_fields(model_dir: Path, names: tuple[str, ...]) -> dict:
    """Per-layer config fields that transformers derives when config.json omits them."""
    if not names:
        return {}
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    return {n: list(getattr(config, n)) for n in names if getattr(config, n, None) is not None}

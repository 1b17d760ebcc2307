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
from typing import Callable

from .errors import UserError

CONFIG_NAME = "config.json"
SAFE_INDEX_NAME = "model.safetensors.index.json"
PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".msgpack", ".h5", ".onnx", ".onnx_data", ".data")
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
COPY_CHUNK_BYTES = 64 * 1024**2
MAX_HEADER_BYTES = 100 * 1000**2   # the safetensors library's own limit

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
    if path.is_file() and path.suffix.lower() == ".gguf":
        from .gguf import checkpoint_from_gguf

        return checkpoint_from_gguf(path)
    if path.exists():
        raise UserError(f"{path} is a file; --model takes a checkpoint directory (or a .gguf file)")
    text = str(path_or_id)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            local = snapshot_download(text, allow_patterns=["*.json", "*.safetensors", "*.model",
                                                            "*.txt", "*.jinja", "tokenizer*"])
        except Exception as exc:
            raise UserError(f"{text} is not a local directory and could not be fetched from the hub "
                            f"(offline, or no such model): {_first_line(exc)}") from None
        return Path(local)
    raise UserError(f"{path} does not exist")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def load_model_info(model: str | Path):
    """(directory, config, adapter) for a checkpoint, with the unsupported cases refused."""
    from .families import adapter_for

    model_dir = resolve_model_dir(model)
    config = read_config(model_dir)
    return model_dir, config, adapter_for(config)


def read_config(model_dir: Path) -> dict:
    path = Path(model_dir) / CONFIG_NAME
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON: {exc}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text") from None
    except OSError as exc:
        raise UserError(f"could not read {path}: {exc.strerror or type(exc).__name__}") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} is not a JSON object of config fields")
    return config


def _read_index(index: Path) -> dict[str, str]:
    """An index's weight_map (tensor name -> shard file name), checked to be one."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{index} is not valid JSON") from None
    except OSError as exc:
        raise UserError(f"could not read {index}: {exc.strerror or type(exc).__name__}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise UserError(f"{index} has no weight_map (a mapping of tensor names to shard files)")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise UserError(f"{index}: weight_map names no file for tensor {_short(name)}")
    return weight_map


def _shard_path(model_dir: Path, shard: str, index: Path) -> Path:
    """The shard an index names, refused unless it lies inside the model directory."""
    # Checked on the name, not after resolving symlinks: the hub's cache links shards to its blobs.
    relative = os.path.normpath(shard)
    path = Path(model_dir) / relative
    if (os.path.isabs(shard) or relative == os.curdir or relative.split(os.sep)[0] == os.pardir
            or "\x00" in shard):
        raise UserError(f"{index} names shard {_short(shard)}, which is outside {model_dir}; "
                        "shards must lie inside the model directory")
    if not path.is_file():
        raise UserError(f"{index} names shard {_short(shard)}, which is not in {model_dir}")
    return path


def _needs_pickle(path: Path) -> bool:
    return path.suffix != ".safetensors"


def _index_of(model_dir: Path) -> Path | None:
    for index_name in (SAFE_INDEX_NAME, PICKLE_INDEX_NAME):
        if (model_dir / index_name).is_file():
            return model_dir / index_name
    return None


def _indexed(model_dir: Path, allow_pickle: bool) -> tuple[Path, dict[str, Path]] | None:
    """(index, tensor name -> shard path) where the checkpoint has an index, checked."""
    index = _index_of(model_dir)
    if index is None:
        return None
    weight_map = _read_index(index)
    shards = {shard: _shard_path(model_dir, shard, index) for shard in sorted(set(weight_map.values()))}
    if not allow_pickle and any(_needs_pickle(p) for p in shards.values()):
        raise _pickle_refused(model_dir, f"its index {index.name} names pickle shards (*.bin)")
    return index, {name: shards[shard] for name, shard in weight_map.items()}


def weight_files(model_dir: Path, allow_pickle: bool = False) -> list[Path]:
    """The checkpoint's weight files, checked to exist (and to lie inside it), in shard order: the
    shards its index names where it has one, else its *.safetensors, else (opt-in) pickle files."""
    model_dir = Path(model_dir)
    indexed = _indexed(model_dir, allow_pickle)
    if indexed is not None:
        return sorted(set(indexed[1].values()))
    safe = sorted(model_dir.glob("*.safetensors"))
    if safe:
        return safe
    pickles = sorted(model_dir.glob("pytorch_model*.bin"))
    if pickles:
        if not allow_pickle:
            raise _pickle_refused(model_dir)
        return pickles
    raise UserError(f"{model_dir} has no weights (*.safetensors, or pytorch_model*.bin)")


def checkpoint_tensors(model_dir: Path, allow_pickle: bool = False) -> list[TensorInfo]:
    """Every tensor of the checkpoint, each read from the one file that holds it: the shard its
    index names where there is an index (a copy in another file is not read), else the one
    safetensors file holding it (a tensor in two unindexed files is refused)."""
    model_dir = Path(model_dir)
    indexed = _indexed(model_dir, allow_pickle)
    if indexed is None:
        infos = tensor_infos(weight_files(model_dir, allow_pickle))
        seen: dict[str, Path] = {}
        for info in infos:
            if info.name in seen:
                raise UserError(f"tensor {_short(info.name)} is in both {seen[info.name].name} and "
                                f"{info.source.name}, and no index says which to use; remove one")
            seen[info.name] = info.source
        return infos
    index, where = indexed
    by_file: dict[Path, dict[str, TensorInfo]] = {}
    for path in sorted(set(where.values())):
        found: dict[str, TensorInfo] = {}
        for info in tensor_infos([path]):
            if info.name in found:
                raise UserError(f"{path} holds tensor {_short(info.name)} twice")
            found[info.name] = info
        by_file[path] = found
    infos = []
    for name, path in where.items():
        info = by_file[path].get(name)
        if info is None:
            raise UserError(f"{index.name} places tensor {_short(name)} in {path.name}, which does not hold it")
        infos.append(info)
    return infos


def _pickle_refused(model_dir: Path, why: str = "holds only pickle weights (*.bin)") -> UserError:
    return UserError(f"{model_dir} {why}, which can run code when loaded; "
                     "pass --allow-pickle if you trust them")


def _short(value, limit: int = 80) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


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


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _safetensors_header(path: Path) -> list[TensorInfo]:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise UserError(f"{path} is truncated (no safetensors header)")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > size - 8:
                raise UserError(f"{path} is truncated or not a safetensors file")
            if header_len > MAX_HEADER_BYTES:
                raise UserError(f"{path}: its header claims {header_len} bytes (safetensors allows "
                                f"{MAX_HEADER_BYTES}); not a safetensors file")
            header_bytes = f.read(header_len)
    except OSError as exc:
        raise UserError(f"could not read {path}: {exc.strerror or type(exc).__name__}") from None
    try:
        header = json.loads(header_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise UserError(f"{path} has a corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise UserError(f"{path} has a corrupt safetensors header (not a JSON object)")
    data_len = size - 8 - header_len
    infos, spans = [], []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        bad = f"{path}: tensor {_short(name)} has a corrupt header entry"
        if not isinstance(entry, dict):
            raise UserError(bad)
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise UserError(f"{bad}: unknown dtype {_short(dtype)} (known: {', '.join(DTYPE_SIZES)})")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise UserError(f"{bad}: shape {_short(shape)} is not a list of sizes")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets)
                or offsets[0] > offsets[1]):
            raise UserError(f"{bad}: data_offsets {_short(offsets)} is not [begin, end]")
        begin, end = offsets
        if end > data_len:
            raise UserError(f"{path} is truncated: tensor {_short(name)} ends past the end of the file")
        info = TensorInfo(name, dtype, tuple(shape), path, 8 + header_len + begin)
        if info.nbytes != end - begin:
            raise UserError(f"{path}: tensor {_short(name)}'s size does not match its shape and dtype")
        infos.append(info)
        spans.append((begin, end, name))
    spans.sort()
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise UserError(f"{path}: tensors {_short(first)} and {_short(second)} overlap (corrupt header)")
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

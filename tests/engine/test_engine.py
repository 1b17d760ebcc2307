"""TensorRT engines (issue 23), on CPU: the standard-ops export, the flags, the profile shapes, the
build path and its manifest through a fake TensorRT module, the runner's shape bookkeeping, and the
Triton tensorrt_plan config. Building or running a real engine needs a GPU and a TensorRT library:
those tests skip, saying why."""
from __future__ import annotations

import enum
import json
import types

import numpy as np
import pytest

from conftest import run_cli
from ulsexport.engine import engine_profiles, parse_batch, resolve_precision, standard_ops_check
from ulsexport.errors import UserError


@pytest.fixture(scope="module", autouse=True)
def engine_command():
    """`ulsexport engine`, added to the command group for these tests (until cli/__init__ registers it)."""
    from ulsexport.cli import main
    from ulsexport.cli.engine import engine

    if "engine" not in main.commands:
        main.add_command(engine)


@pytest.fixture(scope="module")
def trt_export(tmp_path_factory):
    """A tiny 4-layer llama pruned to 2 layers (uls, 2x) and exported for TensorRT: `ulsexport onnx
    --target tensorrt` in Python."""
    from ulsexport.engine.onnx_target import export_standard_onnx
    from ulsexport.prune import plan_for_model, prune_checkpoint
    from ulsexport.testing import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("trt")
    src = make_tiny_checkpoint("llama", root / "full", num_layers=4)
    prune_checkpoint(src, root / "hf", plan_for_model(src, 2), quiet=True)
    return export_standard_onnx(root / "hf", root / "onnx-trt", quiet=True).out_dir


# --- the standard-ops export ---

def test_tensorrt_target_has_standard_ops_only(trt_export):
    import onnx

    from ulsexport.artifact import read_manifest

    graph = onnx.load(str(trt_export / "model.onnx"), load_external_data=False)
    domains = {node.domain for node in graph.graph.node}
    assert domains <= {""}, f"non-default domains {domains}"
    assert not graph.functions
    assert standard_ops_check(trt_export / "model.onnx") == []
    manifest = read_manifest(trt_export)
    assert manifest["target"] == "tensorrt" and manifest["onnx"]["kv_cache"] == "concat"
    assert manifest["optimizations"]["skipped"] == "--no-optimize"


def test_standard_ops_check_names_contrib_ops(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    then = helper.make_graph([helper.make_node("FusedMatMul", ["x", "x"], ["t"], domain="com.microsoft")], "then",
                             [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, 4])])
    nodes = [helper.make_node("SkipLayerNormalization", ["x", "x"], ["a"], domain="com.microsoft"),
             helper.make_node("Relu", ["a"], ["c"], domain="ai.onnx"),
             helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=then)]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, tmp_path / "m.onnx")
    assert standard_ops_check(tmp_path / "m.onnx") == ["com.microsoft::FusedMatMul",
                                                       "com.microsoft::SkipLayerNormalization"]


# --- flags ---

@pytest.mark.parametrize("text, expected", [("1,8,32", (1, 8, 32)), ("8, 1,8", (1, 8)), ("4", (4,)), (None, (1, 8))])
def test_parse_batch(text, expected):
    assert parse_batch(text) == expected


@pytest.mark.parametrize("text", ["0", "1,0", "-2", "a,b", "", ","])
def test_parse_batch_refuses(text):
    with pytest.raises(UserError):
        parse_batch(text)


@pytest.mark.parametrize("args, says", [(["--batch", "0"], "--batch sizes must be at least 1"),
                                        (["--fp16", "--bf16"], "--fp16 and --bf16 exclude each other"),
                                        (["--batch", "x"], "is not a list of batch sizes")])
def test_engine_flags_refused_in_one_line(tmp_path, args, says):
    result = run_cli("engine", "--model", tmp_path, "--out", tmp_path / "trt", *args)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    assert says in result.stderr
    assert not (tmp_path / "trt").exists()


def test_precision_resolution():
    assert resolve_precision("fp16", None) == {"precision": "fp16", "strongly_typed": True, "builder_flag": None}
    assert resolve_precision("fp16", "fp16") == {"precision": "fp16", "strongly_typed": True, "builder_flag": None}
    assert resolve_precision("fp32", "fp16", ("FP16", "BF16"))["builder_flag"] == "FP16"
    assert resolve_precision("fp32", "bf16", ("FP16", "BF16")) == {"precision": "bf16", "strongly_typed": False,
                                                                   "builder_flag": "BF16"}
    with pytest.raises(UserError, match="strongly typed networks only"):
        resolve_precision("fp32", "fp16", ())  # TensorRT for RTX: no FP16 flag
    with pytest.raises(UserError, match="the graph is fp16"):
        resolve_precision("fp16", "bf16", ("FP16", "BF16"))


# --- profile shapes ---

def test_profiles_cover_every_input(trt_export):
    from ulsexport.artifact import read_manifest

    onnx = read_manifest(trt_export)["onnx"]
    profiles = engine_profiles(onnx, (1, 8, 32), 256)
    past = [n for pair in onnx["cache_inputs"] for n in pair]
    assert len(past) == 4 and len(profiles) == 3
    for batch, profile in zip((1, 8, 32), profiles):
        assert set(profile) == {"input_ids", "attention_mask", "position_ids", *past}
        assert profile["input_ids"] == {"min": [1, 1], "opt": [batch, 1], "max": [batch, 256]}
        assert profile["position_ids"] == profile["input_ids"]
        assert profile["attention_mask"] == {"min": [1, 1], "opt": [batch, 128], "max": [batch, 256]}
        heads, head_dim = onnx["num_kv_heads"], onnx["head_dim"]
        for name in past:
            assert profile[name] == {"min": [1, heads, 0, head_dim], "opt": [batch, heads, 127, head_dim],
                                     "max": [batch, heads, 255, head_dim]}


def test_profiles_refuse_unknown_dims_and_short_lengths():
    onnx = {"inputs": ["input_ids"], "cache_inputs": [], "io_shapes": {"input_ids": ["batch", "s7"]}}
    with pytest.raises(UserError, match="dim 's7'"):
        engine_profiles(onnx, (1,), 64)
    with pytest.raises(UserError, match="--max-seq must be at least 2"):
        engine_profiles({**onnx, "io_shapes": {"input_ids": ["batch", "sequence_length"]}}, (1,), 1)


# --- the build path, through a fake TensorRT module ---

class FakeTensorRT(types.SimpleNamespace):
    """A FAKE stand-in for the `tensorrt` / `tensorrt_rtx_bindings` module: the few calls the build
    makes, each recorded in `calls`. It builds nothing: its "engine" is a few marker bytes."""

    def __init__(self, weak_flags=("FP16", "BF16"), parse_ok=True, version="0.0-fake"):
        calls: list[tuple] = []
        fake = self
        flags = enum.IntEnum("BuilderFlag", {name: i for i, name in enumerate(("TF32", *weak_flags))})

        class Logger:
            WARNING, ERROR = 2, 1

            def __init__(self, severity):
                calls.append(("Logger", severity))

        class Tensor:
            def __init__(self, name):
                self.name = name

        class Network:
            def __init__(self, flags):
                self.flags, self.inputs = flags, []

            @property
            def num_inputs(self):
                return len(self.inputs)

            def get_input(self, i):
                return Tensor(self.inputs[i])

        class ParserError:
            def desc(self):
                return "No importer registered for op: GroupQueryAttention"

            def node_name(self):
                return "node_GroupQueryAttention_12"

            def node_operator(self):
                return "GroupQueryAttention"

        class OnnxParser:
            def __init__(self, network, logger):
                self.network = network

            def parse_from_file(self, path):
                import onnx

                calls.append(("parse_from_file", path))
                graph = onnx.load(path, load_external_data=False).graph
                self.network.inputs = [v.name for v in graph.input]
                return parse_ok

            @property
            def num_errors(self):
                return 0 if parse_ok else 1

            def get_error(self, i):
                return ParserError()

        class Cache:
            def __init__(self, blob):
                self.blob = blob

            def serialize(self):
                return memoryview(b"fake-timing-cache:" + self.blob)

        class Profile:
            def __init__(self):
                self.shapes = {}

            def set_shape(self, name, low, opt, high):
                self.shapes[name] = (list(low), list(opt), list(high))

        class Config:
            def __init__(self):
                self.profiles, self.flags, self.cache = [], [], None

            def set_memory_pool_limit(self, pool, size):
                calls.append(("set_memory_pool_limit", pool, size))

            def set_flag(self, flag):
                self.flags.append(flag.name)

            def create_timing_cache(self, blob):
                calls.append(("create_timing_cache", bytes(blob)))
                return Cache(bytes(blob))

            def set_timing_cache(self, cache, ignore_mismatch):
                self.cache = cache

            def get_timing_cache(self):
                return self.cache

            def add_optimization_profile(self, profile):
                self.profiles.append(profile.shapes)

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                fake.network = Network(flags)
                return fake.network

            def create_builder_config(self):
                fake.config = Config()
                return fake.config

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                calls.append(("build_serialized_network",))
                return memoryview(b"FAKE-PLAN")

        super().__init__(__version__=version, calls=calls, Logger=Logger, Builder=Builder, OnnxParser=OnnxParser,
                         BuilderFlag=flags, MemoryPoolType=enum.IntEnum("MemoryPoolType", {"WORKSPACE": 0}),
                         NetworkDefinitionCreationFlag=enum.IntEnum("NetworkDefinitionCreationFlag",
                                                                    {"STRONGLY_TYPED": 1}))


def test_build_with_fake_full_tensorrt(trt_export, tmp_path):
    from ulsexport.artifact import read_manifest
    from ulsexport.engine import build_engine

    fake = FakeTensorRT()
    cache = tmp_path / "caches" / "trt.cache"
    result = build_engine(trt_export, tmp_path / "trt", precision="fp16", batch="1,4", max_seq=64,
                          timing_cache=cache, library="tensorrt", workspace_gb=2, quiet=True, trt_module=fake)
    out = result.out_dir
    source = read_manifest(trt_export)
    past = [n for pair in source["onnx"]["cache_inputs"] for n in pair]
    # the calls made: every past input has a shape range in every profile; the precision flag; the cache
    assert fake.network.flags == 0  # weakly typed: fp16 from an fp32 graph through the FP16 flag
    assert fake.config.flags == ["FP16"]
    assert len(fake.config.profiles) == 2
    for batch, profile in zip((1, 4), fake.config.profiles):
        assert set(past) <= set(profile) and {"input_ids", "attention_mask", "position_ids"} <= set(profile)
        for name in past:
            assert profile[name][0][2] == 0 and profile[name][2][2] == 63 and profile[name][2][0] == batch
    assert ("set_memory_pool_limit", fake.MemoryPoolType.WORKSPACE, 2 * 2**30) in fake.calls
    assert ("create_timing_cache", b"") in fake.calls  # no cache file yet: an empty one
    assert (out / "model.plan").read_bytes() == b"FAKE-PLAN"
    assert (out / "timing.cache").read_bytes() == cache.read_bytes() == b"fake-timing-cache:"
    # the manifest: the export's lineage carried on, and the engine's facts
    manifest = read_manifest(out)
    assert manifest["kind"] == "tensorrt"
    assert manifest["cache_to_original_layer"] == source["cache_to_original_layer"]
    assert manifest["kept"] == source["kept"] and manifest["kept"] and manifest["plan"] == source["plan"]
    assert manifest["graphs"][0]["kept"] == source["graphs"][0]["kept"]
    engine = manifest["engine"]
    assert engine["library"] == "tensorrt" and engine["version"] == "0.0-fake"
    assert engine["precision"] == "fp16" and engine["builder_flag"] == "FP16" and not engine["strongly_typed"]
    assert engine["batch"] == [1, 4] and engine["max_sequence_length"] == 64
    assert engine["profiles"] == engine_profiles(source["onnx"], (1, 4), 64)
    assert engine["engine_bytes"] == len(b"FAKE-PLAN") and engine["build_seconds"] >= 0
    assert engine["timing_cache"]["saved_to"] == str(cache.absolute())
    assert engine["runs_on"] is None and "built_on" in engine
    assert manifest["graphs"][0]["file"] == "model.plan"
    assert (out / "config.json").is_file() and not (out / "model.onnx").exists()
    # a second build loads the cache written by the first
    fake2 = FakeTensorRT()
    build_engine(trt_export, tmp_path / "trt2", batch="1", max_seq=64, timing_cache=cache, library="tensorrt",
                 quiet=True, trt_module=fake2)
    assert ("create_timing_cache", b"fake-timing-cache:") in fake2.calls


def test_build_with_fake_tensorrt_rtx(trt_export, tmp_path):
    from ulsexport.artifact import read_manifest
    from ulsexport.engine import build_engine

    fake = FakeTensorRT(weak_flags=())  # TensorRT for RTX: no FP16/BF16 builder flags
    with pytest.raises(UserError, match="strongly typed networks only"):
        build_engine(trt_export, tmp_path / "no", precision="fp16", library="tensorrt-rtx", trt_module=fake)
    assert not (tmp_path / "no").exists()
    result = build_engine(trt_export, tmp_path / "rtx", max_seq=32, timing_cache=tmp_path / "tc",
                          library="tensorrt-rtx", quiet=True, trt_module=fake)
    assert fake.network.flags == 1 << 1  # STRONGLY_TYPED
    assert fake.config.flags == [] and not any(c[0] == "create_timing_cache" for c in fake.calls)
    engine = read_manifest(result.out_dir)["engine"]
    assert engine["precision"] == "fp32" and engine["strongly_typed"]
    assert engine["runs_on"] == ["8.0", "8.6", "8.9", "12.0", "12.1"]
    assert engine["timing_cache"]["used"] is False
    assert not (result.out_dir / "timing.cache").exists() and not (tmp_path / "tc").exists()


def test_parser_errors_name_the_nodes_and_leave_nothing(trt_export, tmp_path):
    from ulsexport.engine import build_engine

    with pytest.raises(UserError) as caught:
        build_engine(trt_export, tmp_path / "trt", library="tensorrt-rtx", trt_module=FakeTensorRT(parse_ok=False))
    message = str(caught.value)
    assert "node node_GroupQueryAttention_12 (GroupQueryAttention)" in message and "\n" not in message
    assert not (tmp_path / "trt").exists()


def test_refuses_fused_exports(tmp_path):
    from ulsexport.artifact import write_manifest
    from ulsexport.engine import build_engine

    write_manifest(tmp_path, {"kind": "onnx", "onnx": {"kv_cache": "shared", "file": "model.onnx"}})
    with pytest.raises(UserError, match="--target tensorrt"):
        build_engine(tmp_path, tmp_path / "trt", trt_module=FakeTensorRT())


# --- without either library ---

def test_engine_without_library_says_what_to_install(trt_export, tmp_path, monkeypatch):
    import importlib

    from ulsexport.engine import library

    real = importlib.import_module

    def absent(name, *args, **kwargs):
        if name in ("tensorrt", "tensorrt_rtx_bindings"):
            raise ModuleNotFoundError(f"No module named '{name}'", name=name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(library.importlib, "import_module", absent)
    result = run_cli("engine", "--model", trt_export, "--out", tmp_path / "trt")
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert "pip install tensorrt-rtx-cu13-bindings tensorrt-rtx-cu13-libs" in result.stderr
    assert "pip install tensorrt" in result.stderr
    assert not (tmp_path / "trt").exists()
    result = run_cli("engine", "--model", trt_export, "--out", tmp_path / "trt", "--library", "tensorrt-rtx")
    assert result.exit_code == 2 and "TensorRT for RTX is not installed" in result.stderr


# --- the runner's shape bookkeeping ---

def test_runner_picks_profiles_and_shapes(trt_export):
    from ulsexport.artifact import read_manifest
    from ulsexport.runtime.tensorrt import pass_shapes, pick_profile, step_feeds

    onnx = read_manifest(trt_export)["onnx"]
    profiles = engine_profiles(onnx, (1, 8), 64)
    assert pick_profile(profiles, 1, 10, 10) == 0
    assert pick_profile(profiles, 2, 11, 1) == 1
    with pytest.raises(UserError, match="rebuild with a larger --batch or --max-seq"):
        pick_profile(profiles, 9, 5, 1)
    with pytest.raises(UserError):
        pick_profile(profiles, 1, 65, 1)
    shapes = pass_shapes(onnx, batch=3, new=1, past=7)
    heads, head_dim, vocab = onnx["num_kv_heads"], onnx["head_dim"], onnx["io_shapes"]["logits"][-1]
    assert shapes["input_ids"] == (3, 1) and shapes["attention_mask"] == (3, 8)
    assert shapes["past_key_values.1.value"] == (3, heads, 7, head_dim)
    assert shapes["present.1.value"] == (3, heads, 8, head_dim) and shapes["logits"] == (3, 1, vocab)
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    feeds = step_feeds(np.array([[5], [6]]), mask, True)
    assert feeds["position_ids"].tolist() == [[2], [4]]  # as ulsexport.runtime.ort counts left-padded rows
    prompt = step_feeds(np.array([[0, 0, 3], [3, 4, 5]]), mask[:, :3], True)
    assert prompt["position_ids"].tolist() == [[1, 1, 0], [0, 1, 2]]


def test_runner_refuses_non_engines(trt_export):
    from ulsexport.runtime.tensorrt import TensorrtRuntime

    with pytest.raises(UserError, match="kind 'tensorrt'"):
        TensorrtRuntime(trt_export)


# --- Triton ---

def test_tensorrt_plan_step_config_parses(trt_export, tmp_path):
    tritonclient = pytest.importorskip("tritonclient.grpc.model_config_pb2",
                                       reason="tritonclient is not installed (pip install tritonclient[grpc])")
    from google.protobuf import text_format

    from ulsexport.artifact import read_manifest
    from ulsexport.engine import build_engine
    from ulsexport.engine.triton import plan_step_config, write_step_model

    out = build_engine(trt_export, tmp_path / "trt", max_seq=64, library="tensorrt-rtx", quiet=True,
                       trt_module=FakeTensorRT(weak_flags=())).out_dir
    manifest = read_manifest(out)
    config = text_format.Parse(plan_step_config("tiny_step", manifest), tritonclient.ModelConfig())
    assert config.platform == "tensorrt_plan" and config.default_model_filename == "model.plan"
    assert [i.name for i in config.input] == ["input_ids", "attention_mask", "position_ids"]
    states = {s.input_name: s.output_name for s in config.sequence_batching.state}
    assert states == {f"past_key_values.{i}.{kv}": f"present.{i}.{kv}" for i in range(2) for kv in ("key", "value")}
    state = config.sequence_batching.state[0]
    assert list(state.dims) == [manifest["onnx"]["num_kv_heads"], -1, manifest["onnx"]["head_dim"]]
    assert list(state.initial_state[0].dims)[1] == 0 and state.initial_state[0].zero_data
    model = write_step_model(out, tmp_path / "repo", "tiny_step", manifest)
    assert (model / "1" / "model.plan").read_bytes() == b"FAKE-PLAN"
    text_format.Parse((model / "config.pbtxt").read_text(), tritonclient.ModelConfig())


# --- a real engine: GPU and library only ---

def _real_library():
    try:
        import torch
    except ImportError:
        return None, "torch is not installed"
    if not torch.cuda.is_available():
        return None, "needs a CUDA GPU and TensorRT or TensorRT for RTX; this machine has no CUDA device"
    from ulsexport.engine.library import load_library

    try:
        return load_library(), None
    except UserError as exc:
        return None, str(exc)


def test_real_engine_build_and_greedy_match(trt_export, tmp_path):
    found, why = _real_library()
    if found is None:
        pytest.skip(why)
    import torch

    from ulsexport.engine import build_engine
    from ulsexport.runtime.ort import OnnxDecoder
    from ulsexport.runtime.tensorrt import TensorrtRuntime

    lib, _ = found
    out = build_engine(trt_export, tmp_path / "trt", batch="2", max_seq=32, library=lib.name, quiet=True).out_dir
    cc = "{}.{}".format(*torch.cuda.get_device_capability())
    if lib.runs_on and cc not in lib.runs_on:
        pytest.skip(f"built; {lib.title} engines do not run on compute capability {cc} ({lib.runs_on_note})")
    ids = np.random.default_rng(0).integers(3, 100, (2, 6))
    mask = np.ones_like(ids)
    mask[0, :2] = 0
    expected = OnnxDecoder(trt_export).greedy(ids, mask, 4).tokens
    actual = TensorrtRuntime(out).greedy(ids, mask, 4).tokens
    assert json.dumps(actual.tolist()) == json.dumps(expected.tolist())

"""The runtime interface (prefill, step, greedy) and the fixed-width decode loop that CUDA graphs replay.

The capture itself needs a GPU (benchmarks/gpu_benchmark.py measures it on the device); here the same
loop runs uncaptured on the CPU: same buffers, a mask as wide as the cache, one graph id per
(batch, capacity), and it must give the tokens and logits of the plain loop.
"""
import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from ulsexport.errors import UserError  # noqa: E402
from ulsexport.export.trace import export_onnx  # noqa: E402
from ulsexport.precision import TOLERANCES, relative_error  # noqa: E402
from ulsexport.runtime import open_runtime  # noqa: E402
from ulsexport.runtime.ort import CAPACITY_STEP, OnnxDecoder, placements_off_cuda  # noqa: E402
from ulsexport.testing import make_tiny_checkpoint  # noqa: E402

# Head size 16: onnxruntime's CPU GroupQueryAttention rotates only multiples of 16.
SHARED_SHAPE = dict(hidden_size=64, intermediate_size=96, head_dim=16, num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=512)


@pytest.fixture(scope="module")
def shared_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("shared")
    src = make_tiny_checkpoint("llama", root / "hf", num_layers=3, overrides=SHARED_SHAPE)
    out = export_onnx(src, root / "onnx", quiet=True).out_dir
    return src, out


def _left_padded(seed: int, batch: int = 3, prompt: int = 9):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 128, (batch, prompt), dtype=np.int64)
    mask = np.ones_like(ids)
    for row in range(1, batch):
        mask[row, :2 * row] = 0
    return ids, mask


def test_fixed_width_loop_equals_the_plain_loop(shared_export):
    _, onnx_dir = shared_export
    plain = OnnxDecoder(onnx_dir, "cpu")
    fixed = OnnxDecoder(onnx_dir, "cpu", fixed_width=True)
    assert not plain.fixed_width and fixed.fixed_width and not fixed.cuda_graph
    for seed in (0, 1):  # the second call reuses the first call's buffers, stale cache and all
        ids, mask = _left_padded(seed)
        expected = plain.greedy(ids, mask, 12, keep_logits=True)
        got = fixed.greedy(ids, mask, 12, keep_logits=True)
        np.testing.assert_array_equal(got.tokens, expected.tokens)
        assert max(relative_error(a, e) for a, e in zip(got.logits, expected.logits)) < TOLERANCES["fp32"]
    # one graph per (batch, capacity), reused; 3 rows run as 4 (a row of one token added, and dropped)
    assert list(fixed._step_buffers) == [(4, CAPACITY_STEP)]


def test_fixed_width_step_chooses_its_ids_in_the_graph(shared_export):
    """The fixed-width session's graph gains outputs for the next step's inputs (the argmax, the mask): a
    step's result leaves the logits in their buffer and brings back only the ids; ids the caller chose
    itself (teacher forcing here) are uploaded, ids fed back as chosen are already in place."""
    from ulsexport.runtime.base import DeviceLogits
    from ulsexport.runtime.ort import NEXT_TOKEN

    _, onnx_dir = shared_export
    plain = OnnxDecoder(onnx_dir, "cpu")
    fixed = OnnxDecoder(onnx_dir, "cpu", fixed_width=True)
    host = OnnxDecoder(onnx_dir, "cpu", fixed_width=True, device_argmax=False)
    assert fixed.device_argmax and not host.device_argmax and not plain.device_argmax
    assert NEXT_TOKEN in {o.name for o in fixed.session.get_outputs()}
    assert NEXT_TOKEN not in {o.name for o in host.session.get_outputs()}
    ids, mask = _left_padded(5)
    forced = np.random.default_rng(6).integers(3, 128, (4, len(ids)), dtype=np.int64)
    runs = {}
    for name, decoder in (("plain", plain), ("fixed", fixed), ("host", host)):
        state, logits = decoder.prefill(ids, mask, 5)
        steps = []
        for tokens in forced:
            logits = decoder.step(state, tokens)
            steps.append(decoder.to_host(logits).copy())
            assert isinstance(logits, DeviceLogits) == (name == "fixed")
            np.testing.assert_array_equal(decoder.next_tokens(logits), steps[-1].argmax(-1))
        runs[name] = steps
    for name in ("fixed", "host"):
        assert max(relative_error(a, e) for a, e in zip(runs[name], runs["plain"])) < TOLERANCES["fp32"]
    uploads = {"fixed": [], "host": []}
    for name, decoder in (("fixed", fixed), ("host", host)):
        for buffers in decoder._step_buffers.values():
            for value in buffers.ids + buffers.mask:
                update = value.update_inplace
                value.update_inplace = lambda array, update=update, name=name: (uploads[name].append(array),
                                                                                update(array))
        decoder.greedy(ids, mask, 6)
    # the ids the prompt chose and the first wide mask go up; the graph makes the rest itself
    assert len(uploads["fixed"]) == 2 and len(uploads["host"]) == 2 * 5


def test_without_the_onnx_package_the_host_takes_the_argmax(shared_export, monkeypatch):
    import sys

    _, onnx_dir = shared_export
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    decoder = OnnxDecoder(onnx_dir, "cpu", fixed_width=True)
    assert decoder.fixed_width and not decoder.device_argmax and "onnx package" in decoder.device_argmax_off
    ids, mask = _left_padded(8)
    np.testing.assert_array_equal(decoder.greedy(ids, mask, 5).tokens,
                                  OnnxDecoder(onnx_dir, "cpu").greedy(ids, mask, 5).tokens)


class RerunSession:
    """A session that runs each bound call three times, as onnxruntime does in the call that captures a
    CUDA graph (warm-up runs, then the capture): a step must give the same result however often it runs."""

    def __init__(self, session):
        self.session = session

    def run_with_iobinding(self, *args, **kwargs):
        for _ in range(3):
            self.session.run_with_iobinding(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.session, name)


def test_a_step_run_again_as_capture_runs_it_gives_the_same_tokens(shared_export):
    import onnxruntime as ort

    from ulsexport.artifact import read_manifest
    from ulsexport.runtime.ort import session_graph, session_options

    _, onnx_dir = shared_export
    model = session_graph(str(onnx_dir / read_manifest(onnx_dir)["onnx"]["file"]), next_inputs=True)
    session = ort.InferenceSession(model, session_options(model, onnx_dir), providers=["CPUExecutionProvider"])
    rerun = OnnxDecoder(onnx_dir, "cpu", fixed_width=True, session=RerunSession(session))
    assert rerun.device_argmax
    ids, mask = _left_padded(7)
    expected = OnnxDecoder(onnx_dir, "cpu").greedy(ids, mask, 8, keep_logits=True)
    got = rerun.greedy(ids, mask, 8, keep_logits=True)
    np.testing.assert_array_equal(got.tokens, expected.tokens)
    assert max(relative_error(a, e) for a, e in zip(got.logits, expected.logits)) < TOLERANCES["fp32"]
    queued = OnnxDecoder(onnx_dir, "cpu", fixed_width=True, session=RerunSession(session), queued_steps=3)
    np.testing.assert_array_equal(queued.greedy(ids, mask, 8).tokens, expected.tokens)


def test_queued_steps_give_the_tokens_of_the_step_by_step_loop(shared_export):
    """`decode` queues steps back to back (on CUDA onnxruntime returns at each graph's launch, the last
    waits) and reads their ids together: each step must find the ids and mask the one before wrote, in
    a ring of phases long enough that no step's ids are overwritten before they are read."""
    _, onnx_dir = shared_export
    stepwise = OnnxDecoder(onnx_dir, "cpu", fixed_width=True)
    queued = OnnxDecoder(onnx_dir, "cpu", fixed_width=True, queued_steps=3)
    assert stepwise.queued_steps == 1 and queued.queued_steps == 3
    for seed in (2, 3):  # the second call reuses the first call's buffers and captures
        ids, mask = _left_padded(seed)
        expected = OnnxDecoder(onnx_dir, "cpu").greedy(ids, mask, 12)
        for decoder in (stepwise, queued):
            np.testing.assert_array_equal(decoder.greedy(ids, mask, 12).tokens, expected.tokens)
    uploads, launches = [], []
    for value in (v for b in queued._step_buffers.values() for v in b.ids + b.mask):
        update = value.update_inplace
        value.update_inplace = lambda array, update=update: (uploads.append(array), update(array))
    run_options = queued.run_options
    queued.run_options = lambda graph_id, wait=True: (launches.append((graph_id, wait)), run_options(graph_id, wait))[1]
    run = queued.greedy(ids, mask, 12)
    np.testing.assert_array_equal(run.tokens, expected.tokens)
    # the prefill, then 11 steps in calls of 3, 3, 3 and 2, each call's last step waiting; the ring's
    # phases (graphs 1 to 4) taken in turn; only the first step's ids and mask went up
    assert len(run.step_seconds) == 5 and len(uploads) == 2
    assert [wait for _, wait in launches[1:]] == [False, False, True] * 3 + [False, True]
    assert [graph for graph, _ in launches[1:]] == [1, 2, 3, 4] * 2 + [1, 2, 3]
    assert launches[0] == (-1, True)  # the prompt, uncaptured
    buffers = queued._step_buffers[(4, CAPACITY_STEP)]
    assert len(buffers.ids) == 4 and buffers.graph_ids == [1, 2, 3, 4]
    state, logits = queued.prefill(ids, mask, 8)
    with pytest.raises(ValueError, match="queues 1 to 3"):
        queued.decode(state, queued.next_tokens(logits), 4)
    with pytest.raises(UserError, match="queued decode steps need"):
        OnnxDecoder(onnx_dir, "cpu", queued_steps=2)
    with pytest.raises(UserError, match="at least 1"):
        OnnxDecoder(onnx_dir, "cpu", fixed_width=True, queued_steps=0)


def test_ids_the_caller_changes_in_place_are_uploaded(shared_export):
    """Ids fed back as the graph chose them are not uploaded again; the same array changed in place (a
    token forced, say) must be, by either path."""
    _, onnx_dir = shared_export
    ids, mask = _left_padded(4)
    plain = OnnxDecoder(onnx_dir, "cpu")
    for queued_steps in (1, 3):
        decoder = OnnxDecoder(onnx_dir, "cpu", fixed_width=True, queued_steps=queued_steps)
        runs = {}
        for name, runtime in (("plain", plain), ("fixed", decoder)):
            state, logits = runtime.prefill(ids, mask, 8)
            chosen = runtime.decode(state, runtime.next_tokens(logits), queued_steps)
            chosen[-1][:] = 5  # the caller forces token 5 on every row
            runs[name] = np.stack(runtime.decode(state, chosen[-1], queued_steps), axis=1)
        np.testing.assert_array_equal(runs["fixed"], runs["plain"])


def test_fixed_width_buffers_per_batch_and_capacity(shared_export):
    _, onnx_dir = shared_export
    decoder = OnnxDecoder(onnx_dir, "cpu", fixed_width=True)
    for batch, new in ((1, 4), (2, 4), (1, CAPACITY_STEP), (3, 4), (4, 4)):
        ids = np.full((batch, 5), 7, np.int64)
        decoder.greedy(ids, np.ones_like(ids), new)
    assert sorted(decoder._step_buffers) == [(1, CAPACITY_STEP), (1, 2 * CAPACITY_STEP), (2, CAPACITY_STEP),
                                             (4, CAPACITY_STEP)]  # batches 3 and 4 share one
    # a step at a time (the CPU's default): two phases each (one reads the ids and mask the other
    # writes), each its own graph
    assert sorted(g for b in decoder._step_buffers.values() for g in b.graph_ids) == list(range(1, 9))
    assert [decoder.rows_for(b) for b in (1, 2, 3, 5, 8, 9, 32, 33)] == [1, 2, 4, 8, 8, 16, 32, 64]
    assert decoder.capacity_for(CAPACITY_STEP + 1) == 2 * CAPACITY_STEP
    assert decoder.capacity_for(10_000) == 512  # never past the export's positions
    assert decoder.run_options(1) is None  # no capture on the CPU: no graph ids passed
    decoder.cuda_graph = True  # the options a captured step would run with, made once per (graph, wait)
    waits, launches = decoder.run_options(3), decoder.run_options(3, wait=False)
    assert decoder.run_options(3) is waits and waits is not launches
    assert [(o.get_run_config_entry("gpu_graph_id"), o.get_run_config_entry("disable_synchronize_execution_providers"))
            for o in (waits, launches)] == [("3", "0"), ("3", "1")]


def test_cuda_graph_needs_cuda_and_the_shared_cache(shared_export):
    _, onnx_dir = shared_export
    with pytest.raises(UserError, match="needs --device cuda"):
        OnnxDecoder(onnx_dir, "cpu", cuda_graph=True)
    assert not OnnxDecoder(onnx_dir, "cpu").cuda_graph  # the CPU default: off, nothing to say


def test_a_session_that_fell_back_to_the_cpu_is_refused(shared_export, monkeypatch):
    """onnxruntime-gpu without its CUDA libraries warns and runs on the CPU: the runtime says so instead."""
    import onnxruntime as ort

    _, onnx_dir = shared_export
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])

    def make(path, options, providers):
        return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    with pytest.raises(UserError, match=r"could not start its CUDA provider .* \(LD_LIBRARY_PATH\)"):
        OnnxDecoder(onnx_dir, "cuda", session=make)


def test_prefill_and_step_match_greedy_and_pytorch(shared_export):
    src, onnx_dir = shared_export
    ids, mask = _left_padded(3)
    for runtime in (open_runtime(onnx_dir, "ort"), open_runtime(src, "torch")):
        run = runtime.greedy(ids, mask, 6, keep_logits=True)
        state, logits = runtime.prefill(ids, mask, 6)
        tokens = [runtime.to_host(runtime.next_tokens(logits))]
        for _ in range(5):
            tokens.append(runtime.to_host(runtime.next_tokens(runtime.step(state, tokens[-1]))))
        np.testing.assert_array_equal(np.stack(tokens, 1), run.tokens)
        assert len(run.step_seconds) == 6 and run.prefill_seconds > 0 and run.decode_seconds > 0
    np.testing.assert_array_equal(open_runtime(onnx_dir, "ort").greedy(ids, mask, 6).tokens,
                                  open_runtime(src, "torch").greedy(ids, mask, 6).tokens)


def test_ort_runtime_refuses_another_dtype(shared_export):
    _, onnx_dir = shared_export
    with pytest.raises(UserError, match="fp32 export"):
        open_runtime(onnx_dir, "ort", "fp16")


def test_placement_log_names_the_nodes_off_cuda():
    log = "\n".join([
        "2026-12-01 [V:onnxruntime:, session_state.cc:1598 VerifyEachNodeIsAssignedToAnEp] Node placements",
        "2026-12-01 [V:onnxruntime:, session_state.cc:1345 VerifyEachNodeIsAssignedToAnEp]  Node(s) placed on "
        "[CUDAExecutionProvider]. Number of nodes: 2",
        "2026-12-01 [V:onnxruntime:, session_state.cc:1347 VerifyEachNodeIsAssignedToAnEp]   MatMul (mm0)",
        "2026-12-01 [V:onnxruntime:, session_state.cc:1347 VerifyEachNodeIsAssignedToAnEp]   Add (add0)",
        "2026-12-01 [V:onnxruntime:, session_state.cc:1345 VerifyEachNodeIsAssignedToAnEp]  Node(s) placed on "
        "[CPUExecutionProvider]. Number of nodes: 1",
        "2026-12-01 [V:onnxruntime:, session_state.cc:1347 VerifyEachNodeIsAssignedToAnEp]   Shape (shape_of_mask)",
        "2026-12-01 [I:onnxruntime:, inference_session.cc:3424 operator()] Session successfully initialized.",
    ])
    assert placements_off_cuda(log) == ["Shape (shape_of_mask)"]
    assert placements_off_cuda("[V:onnxruntime:, x] All nodes placed on [CUDAExecutionProvider]. Number of nodes: 9") == []
    assert placements_off_cuda(" All nodes placed on [CPUExecutionProvider]. Number of nodes: 9") == [
        "all 9 nodes (CPUExecutionProvider)"]


def test_per_layer_kernels_splits_a_step_by_layer_and_compares_with_the_floor():
    from ulsexport.testing import per_layer_kernels

    kernels = [{"name": "nvjet_sm90_hsh_192x8", "ms_per_step": 0.32, "per_step": 32},   # 4 GEMMs x 8 layers
               {"name": "SkipLayerNorm", "ms_per_step": 0.04, "per_step": 16},
               {"name": "gemv_lm_head", "ms_per_step": 0.05, "per_step": 1},
               {"name": "argmax", "ms_per_step": 0.01, "per_step": 1}]
    report = per_layer_kernels(kernels, layers=8, layer_bytes=1.5e8, bandwidth=4e12)
    assert report["layer_kernels"] == 6 and report["layer_us"] == pytest.approx(45.0)
    assert report["layer_gemm_us"] == pytest.approx(40.0) and report["outside_layers_us"] == pytest.approx(60.0)
    assert report["layer_floor_us"] == pytest.approx(37.5) and report["fraction_of_floor"] == pytest.approx(37.5 / 45)
    assert [k["name"] for k in report["per_layer"]] == ["nvjet_sm90_hsh_192x8", "SkipLayerNorm"]


def test_gpu_time_split_separates_busy_time_short_and_long_gaps():
    from ulsexport.testing import gpu_time_split

    # overlapping activities count once; a 1 us gap is a launch gap, a 35 us one the host's
    split = gpu_time_split([(0, 10), (11, 20), (15, 25), (60, 70), (71, 80)], short_gap_us=5)
    assert split == {"busy_us": 43.0, "short_gap_us": 2.0, "short_gaps": 2, "long_gap_us": 35.0, "long_gaps": 1}
    assert gpu_time_split([], 5)["busy_us"] == 0.0

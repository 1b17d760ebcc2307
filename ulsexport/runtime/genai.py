"""onnxruntime-genai's own generation loop as a runtime, over an artifact of either ONNX builder."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..artifact import GENAI_CONFIG, artifact_path
from ..errors import UserError, first_line
from .base import GreedyRun, Runtime

INSTALL_HINT = "pip install 'ulsexport[genai]' (CPU) or 'ulsexport[genai-cuda]' (CUDA)"


def import_genai():
    """The onnxruntime_genai module, or one line saying how to install it."""
    try:
        import onnxruntime_genai
    except ImportError:
        raise UserError(f"onnxruntime-genai is not installed: {INSTALL_HINT}") from None
    return onnxruntime_genai


def check_genai_config(folder: Path) -> dict:
    """The folder's genai_config.json, refused in one line unless it is JSON whose every `filename` (the
    decoder's, an embedding's, ...) names a file inside the folder: onnxruntime-genai opens whatever it names."""
    import json

    path = Path(folder) / GENAI_CONFIG
    if not path.is_file():
        raise UserError(f"{folder} has no {GENAI_CONFIG}; build it with `ulsexport onnx` (either builder)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({first_line(exc)}); rebuild it with `ulsexport onnx`") from None

    def filenames(node, where):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "filename":
                    yield value, f"{where}.{key}"
                else:
                    yield from filenames(value, f"{where}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                yield from filenames(value, f"{where}[{i}]")

    for value, where in filenames(config, GENAI_CONFIG):
        file = artifact_path(folder, value, where)
        if not file.is_file():
            raise UserError(f"{folder}: {where} names {value!r}, which is not a file in the artifact; rebuild it")
    return config


class GenaiRuntime(Runtime):
    """An artifact with a genai_config.json, decoded by onnxruntime-genai's own generation loop.

    Every run makes exactly the tokens asked for: `min_length` is the whole length, so genai never
    stops at an eos token. The price: where the model's own top token is eos, genai takes the next
    best (get_logits still returns the raw logits), so a parity run compares up to the first eos. A
    left-padded batch is decoded one row at a time on the row's real tokens: genai marks padding
    by pad_token_id, and neither the builder's GroupQueryAttention graph nor genai's masks for our
    graph reproduce Hugging Face's left-padded results (measured); unpadded batches run batched.

    `greedy` runs genai's own loop (generate_next_token: genai picks the tokens); `prefill` and
    `step` expose the same loop one token at a time for unpadded batches, the caller's tokens checked
    to be genai's greedy ones.
    """

    name = "genai"

    def __init__(self, folder: str | Path, dtype: str = "fp32", device: str = "cpu", cuda_graph: bool = False):
        og = import_genai()
        folder = Path(folder)
        check_genai_config(folder)
        config = og.Config(str(folder))
        config.clear_providers()
        if device.startswith("cuda"):
            config.append_provider("cuda")
            if cuda_graph:  # genai captures decode steps (it needs the shared past/present buffer)
                config.set_provider_option("cuda", "enable_cuda_graph", "1")
        try:
            self.model = og.Model(config)
        except Exception as exc:  # genai's load errors are one line already
            raise UserError(f"onnxruntime-genai could not load {folder}: {first_line(exc)}") from None
        self.og = og

    @classmethod
    def open(cls, folder: str | Path, dtype: str | None = None, device: str = "cpu") -> GenaiRuntime:
        return cls(folder, dtype or "fp32", device)

    def _generator(self, batch: int, length: int):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=length, min_length=length, batch_size=batch, do_sample=False)
        return self.og.Generator(self.model, params)

    def prefill(self, input_ids, attention_mask, max_new_tokens: int):
        ids = np.asarray(input_ids, np.int64)
        if not np.asarray(attention_mask).all():
            raise UserError("onnxruntime-genai marks padding by pad_token_id, which does not reproduce Hugging "
                            "Face's left-padded results: prefill unpadded batches (greedy decodes padded rows "
                            "one at a time)")
        generator = self._generator(*ids.shape[:1], ids.shape[1] + max_new_tokens)
        generator.append_tokens(ids)
        return generator, np.array(generator.get_logits())[:, -1]

    def step(self, state, next_ids):
        # genai appends tokens a second time only at batch 1 (AppendTokens), so the step appends genai's
        # own greedy choice, which must be the caller's: prefill/step serve greedy decoding here
        state.generate_next_token()
        chosen = np.array(state.get_next_tokens())
        if not np.array_equal(chosen, np.asarray(next_ids).reshape(chosen.shape)):
            raise UserError("onnxruntime-genai appends its own greedy token at each step (it refuses eos before "
                            "max_length), and the caller chose others; its step serves greedy decoding only")
        return np.array(state.get_logits())[:, -1]

    def greedy(self, input_ids, attention_mask, new_tokens: int, keep_logits: bool = False):
        ids, mask = np.asarray(input_ids, np.int64), np.asarray(attention_mask)
        if mask.all():
            return self._run(ids, new_tokens, keep_logits)
        rows = [self._run(ids[row:row + 1, mask[row] == 1], new_tokens, keep_logits) for row in range(len(ids))]
        logits = [np.concatenate(step) for step in zip(*(r.logits for r in rows))] if keep_logits else []
        return GreedyRun(np.concatenate([r.tokens for r in rows]), logits,
                         [sum(step) for step in zip(*(r.step_seconds for r in rows))])

    def _run(self, ids: np.ndarray, new_tokens: int, keep_logits: bool) -> GreedyRun:
        """One batched run of genai's own loop."""
        generator = self._generator(ids.shape[0], ids.shape[1] + new_tokens)
        tokens, logits, seconds = [], [], []
        start = time.perf_counter()
        generator.append_tokens(ids)  # the prefill forward pass
        for _ in range(new_tokens):
            if keep_logits:  # the logits the next token is chosen from (genai computes them here, lazily)
                logits.append(np.array(generator.get_logits())[:, -1].astype(np.float32))
            generator.generate_next_token()
            tokens.append(np.array(generator.get_next_tokens()))  # a host copy: the step has finished
            now = time.perf_counter()
            seconds.append(now - start)
            start = now
        return GreedyRun(np.stack(tokens, 1), logits, seconds)

"""The generate model that `ulsexport triton` writes: Triton's Python backend runs it, in the stub
process, over the artifact copied into the model repository.

The repository's `model.py` is one import of `TritonPythonModel` from here; its settings come from
the model config's `parameters` (artifact path relative to the model directory, runtime, device,
dtype, max_tokens, default_max_tokens).

What one `execute` does with the requests Triton's dynamic batcher hands it (up to max_batch_size):
validate each (a bad one gets an error response, the rest go on), tokenize (the artifact's
tokenizer, BOS added as it adds it by default), left-pad all into one batch, prefill, then step
greedily until every row has its own max_tokens or has emitted an end-of-sequence token (a row
stops there, the eos id being its last output id; the others go on decoding). A row's tokens do not
depend on its batchmates: padding is masked and positions are counted per row.

Depths: over a multi-depth export (`ulsexport onnx --speedups 1,2`) a request may name the depth it
wants in its optional `depth` input ("full", "2x", ...; the export's default graph when left out or
"default"). One `execute` groups its valid requests by depth and decodes each group as its own batch
(one after the other, over the one copy of the weights); a depth the export lacks is refused with
the depths it has. Over a single-depth artifact the only depth is "default" (leave `depth` out).

Two models share this class: the plain one answers each request with one response (KServe
/infer, /generate, gRPC ModelInfer); the decoupled one (`model_transaction_policy.decoupled`)
sends one response per token, the last flagged final (generate_stream, gRPC streaming), or one
response when the request says `"stream": false`.

`Generator` is the part without Triton (validation, batching, the decode loop), so it is tested
without a server.
"""
from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DEFAULT_MAX_TOKENS = 16
DEFAULT_DEPTH = "default"    # the alias of the default graph; the only depth of a single-depth artifact
BATCHING = ("auto", "continuous", "static")
SPECULATIVE = "speculative"  # the depth a request names to be drafted by the draft depth and verified at full
ENGINE_CAPACITY = 4096       # positions per slot of the decode engine at most (prompt + new tokens)


class RequestError(ValueError):
    """A request the model refuses; the message goes back to the client as is."""


@dataclass
class Prompt:
    ids: list[int]
    max_tokens: int
    stream: bool = False
    new_ids: list[int] = field(default_factory=list)
    done: bool = False
    text_sent: str = ""          # streamed so far (incremental detokenization)
    depth: str = DEFAULT_DEPTH   # the depth tag it is decoded at (resolved: never the alias over a multi-depth export)
    arrived: float = 0.0         # when the model got it (time.perf_counter), for time to first token
    engine_request: object = None  # its decode engine Request, where the engine runs it


def _eos_ids(folder: Path, tokenizer) -> set[int]:
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        path = folder / name
        if path.is_file():
            value = json.loads(path.read_text()).get("eos_token_id")
            if value is not None:
                ids.update(value if isinstance(value, list) else [value])
                break
    if not ids and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return {int(i) for i in ids}


def model_limits(folder: Path) -> tuple[int | None, int | None]:
    """(vocabulary size, positions) of an artifact: config.json, and the manifest's
    max_sequence_length where the export has one (shared cache)."""
    from ..artifact import Artifact

    try:
        config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    except (ValueError, UnicodeDecodeError):
        from ..errors import UserError
        raise UserError(f"{folder / 'config.json'} is not valid JSON") from None
    config = config if isinstance(config, dict) else {}
    config = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    vocab = config.get("vocab_size")
    vocab = vocab if isinstance(vocab, int) and not isinstance(vocab, bool) and vocab > 0 else None
    onnx = Artifact.open(folder).onnx
    positions = [p for p in (config.get("max_position_embeddings"), onnx.get("max_sequence_length"))
                 if isinstance(p, int) and not isinstance(p, bool) and p > 0]
    return vocab, (min(positions) if positions else None)


class Generator:
    """Validation, batching and greedy decoding over one runtime; no Triton in here."""

    def __init__(self, folder: str | Path, runtime: str | None = None, device: str = "cpu", dtype: str | None = None,
                 max_tokens: int = 512, default_max_tokens: int = DEFAULT_MAX_TOKENS, cuda_graph: bool = True,
                 batching: str = "auto", slots: int = 8, draft: str | None = None, draft_tokens: int = 4,
                 decode_kernels: bool = False):
        from ..artifact import Artifact
        from ..tokenizer import load_tokenizer
        from ..runtime import default_runtime, open_runtime

        if batching not in BATCHING:
            raise ValueError(f"batching '{batching}' is not one of {', '.join(BATCHING)}")
        self.folder = Path(folder)
        artifact = Artifact.open(self.folder)
        self.runtime_name = runtime or default_runtime(artifact.kind)
        if dtype is None and self.runtime_name == "torch":  # TorchRuntime.open needs a dtype; the others read it
            dtype = "fp32"
        onnx = artifact.onnx
        # continuous batching (the decode engine) where the artifact allows it: ort over the shared cache; by
        # default on the CPU only: the engine's captured steps on CUDA have not been measured on a GPU yet
        engine = (self.runtime_name == "ort" and onnx.get("kv_cache") == "shared"
                  and (batching == "continuous" or batching == "auto" and device == "cpu"))
        self.batching_off = None if engine or batching == "static" else (
            "the decode engine needs --runtime ort over an export with the shared KV cache"
            if batching == "continuous" or device == "cpu"
            else "on CUDA the fixed-batch loop stays the default until the engine is measured there")
        # ort on CUDA captures decode steps where it can (cuda_graph=False turns that off), the graph choosing
        # each step's ids (the engine's captured steps too: only the ids come back)
        options = {}
        if self.runtime_name == "ort":
            options = {**({"cuda_graph": False} if not cuda_graph else {}),
                       **({"decode_kernels": True} if decode_kernels else {})}
        self.runtime = open_runtime(self.folder, self.runtime_name, dtype, device, **options)
        self.tokenizer = load_tokenizer(self.folder)
        self.max_tokens = int(max_tokens)
        self.default_max_tokens = min(int(default_max_tokens), self.max_tokens)
        self.vocab, self.positions = model_limits(self.folder)
        if self.vocab is None:
            self.vocab = len(self.tokenizer)
        self.eos = _eos_ids(self.folder, self.tokenizer)
        self.pad_id = int(self.tokenizer.pad_token_id or 0)
        # depths served: a multi-depth export's graph tags (MultiDepthDecoder), else the one "default"
        self.multi_depth = callable(getattr(self.runtime, "decoder", None)) and hasattr(self.runtime, "depths")
        self.depths = list(self.runtime.depths) if self.multi_depth else [DEFAULT_DEPTH]
        self.default_depth = self.runtime.default if self.multi_depth else DEFAULT_DEPTH
        self.engine, self.slots = None, slots
        if engine:
            from ..runtime.decode_engine import DecodeEngine

            self.engine = DecodeEngine(self.runtime, slots, min(self.positions or ENGINE_CAPACITY, ENGINE_CAPACITY),
                                       draft=draft or None, draft_tokens=draft_tokens)

    def submit(self, p: Prompt, on_token=None, on_error=None):
        """Hand `p` to the decode engine (continuous batching); `on_token(p, token)` runs on the engine's
        thread as each token is known, `p.done` set on the last; `on_error(p, exc)` if a step fails."""
        from ..errors import UserError
        from ..runtime.decode_engine import Request

        def token(request, value):
            p.new_ids.append(value)
            p.done = request.done
            if on_token is not None:
                on_token(p, value)

        def error(request, exc):
            p.done = True
            if on_error is not None:
                on_error(p, exc)

        speculative = p.depth == SPECULATIVE
        depth = None if speculative or not self.multi_depth else p.depth
        request = Request(p.ids, p.max_tokens, depth=depth, speculative=speculative, eos=frozenset(self.eos),
                          on_token=token, on_error=error)
        try:
            return self.engine.add(request)
        except UserError as exc:
            raise RequestError(str(exc)) from None

    def depth(self, value=None) -> str:
        """The depth tag a request's `depth` input names (left out, empty or "default": the default graph)."""
        if value is not None:
            value = np.asarray(value, dtype=object)
            if value.size != 1:
                raise RequestError(f"depth holds {value.size} strings; send one (one of: {', '.join(self.depths)})")
            value = value.reshape(-1)[0]
            if isinstance(value, bytes):
                value = value.decode("utf-8", errors="replace")
            value = str(value).strip()
        if not value or value == DEFAULT_DEPTH:
            return self.default_depth
        if value == SPECULATIVE:
            if self.engine is None or self.engine.draft is None:
                raise RequestError("depth 'speculative': this model has no draft depth (ulsexport triton --draft-depth "
                                   "over a multi-depth export, with continuous batching)")
            return SPECULATIVE
        if value in self.depths:
            return value
        if not self.multi_depth:
            raise RequestError(f"depth '{value}': this model serves a single-depth artifact; leave depth out "
                               f"(or send '{DEFAULT_DEPTH}'). Several depths need a multi-depth export "
                               f"(ulsexport onnx --speedups 1,2 ...)")
        raise RequestError(f"no depth '{value}' in this model; it serves: {', '.join(self.depths)} "
                           f"(default {self.default_depth}, used when depth is left out)")

    # -- one request ----------------------------------------------------------------------------
    def prompt(self, text=None, ids=None, max_tokens=None, stream: bool = False, depth=None) -> Prompt:
        """A checked prompt from a request's inputs (numpy arrays as Triton gives them, or plain values)."""
        depth = self.depth(depth)
        if text is None and ids is None:
            raise RequestError("the request has neither text_input (a string) nor input_ids (token ids); send one")
        if text is not None and ids is not None:
            raise RequestError("send text_input or input_ids, not both")
        if ids is not None:
            ids = np.asarray(ids)
            if ids.ndim == 2 and ids.shape[0] != 1:
                raise RequestError(f"one prompt per request: input_ids has shape {list(ids.shape)}, send [1, n]")
            ids = [int(i) for i in ids.reshape(-1)]
            if not ids:
                raise RequestError("input_ids is empty; send at least one token id")
            bad = sorted({i for i in ids if not 0 <= i < self.vocab})
            if bad:
                raise RequestError(f"input_ids holds ids outside the vocabulary [0, {self.vocab}): "
                                   f"{', '.join(map(str, bad[:5]))}{' ...' if len(bad) > 5 else ''}")
        else:
            text = np.asarray(text, dtype=object)
            if text.size != 1:
                raise RequestError(f"one prompt per request: text_input has {text.size} strings, send one")
            text = text.reshape(-1)[0]
            if isinstance(text, bytes):
                try:
                    text = text.decode("utf-8")
                except UnicodeDecodeError:
                    raise RequestError("text_input is not valid UTF-8") from None
            text = str(text)
            if not text:
                raise RequestError("text_input is empty; send a prompt of at least one character")
            ids = list(self.tokenizer(text).input_ids)
        if max_tokens is None:
            n = self.default_max_tokens
        else:
            value = np.asarray(max_tokens)
            if value.size != 1 or value.dtype.kind not in "iu":  # never cast a float or a string
                raise RequestError(f"max_tokens must be one whole number (got {value.reshape(-1)[:3].tolist()})")
            n = int(value.reshape(-1)[0])  # a Python int: no wrapping from here on
            if n < 1:
                raise RequestError(f"max_tokens must be at least 1 (got {n})")
            if n > self.max_tokens:
                raise RequestError(f"max_tokens {n} is over this model's limit of {self.max_tokens} "
                                   f"(set by `ulsexport triton --max-tokens`)")
        if self.positions and len(ids) + n > self.positions:
            raise RequestError(f"the prompt's {len(ids)} tokens + max_tokens {n} = {len(ids) + n} pass the model's "
                               f"{self.positions} positions; shorten the prompt or ask for fewer tokens")
        return Prompt(ids, n, stream, depth=depth)

    # -- one batch ------------------------------------------------------------------------------
    def groups(self, prompts: list[Prompt]) -> dict[str, list[int]]:
        """Rows of `prompts` by depth, depths in the order they first appear."""
        groups: dict[str, list[int]] = {}
        for row, p in enumerate(prompts):
            groups.setdefault(p.depth, []).append(row)
        return groups

    def decode(self, prompts: list[Prompt], on_token=None) -> int:
        """Greedy decoding of the prompts, one left-padded batch per depth; fills each prompt's new_ids.
        `on_token(row, prompt, token)` (row: the index in `prompts`) is called as each row's token is
        known. Returns the steps run, summed over the depths."""
        groups = self.groups(prompts)
        steps = 0
        for depth, rows in groups.items():
            def mapped(row, p, token, rows=rows):
                on_token(rows[row], p, token)
            steps += self._decode_batch([prompts[r] for r in rows], depth, mapped if on_token else None)
        return steps

    def _decode_batch(self, prompts: list[Prompt], depth: str, on_token=None) -> int:
        width = max(len(p.ids) for p in prompts)
        ids = np.full((len(prompts), width), self.pad_id, np.int64)
        mask = np.zeros((len(prompts), width), np.int64)
        for row, p in enumerate(prompts):
            ids[row, width - len(p.ids):] = p.ids
            mask[row, width - len(p.ids):] = 1
        steps = max(p.max_tokens for p in prompts)
        rt = self.runtime.decoder(depth) if self.multi_depth else self.runtime
        state, chosen = None, None
        for step in range(steps):
            if state is None:
                state, logits = rt.prefill(ids, mask, steps)
            else:
                logits = rt.step(state, chosen)
            chosen = rt.next_tokens(logits)
            host = np.asarray(rt.to_host(chosen)).reshape(-1)
            for row, p in enumerate(prompts):
                if p.done:
                    continue
                token = int(host[row])
                p.new_ids.append(token)
                p.done = token in self.eos or len(p.new_ids) >= p.max_tokens
                if on_token is not None:
                    on_token(row, p, token)
            if all(p.done for p in prompts):
                return step + 1
        return steps

    def text(self, p: Prompt) -> str:
        """The new tokens' text as it continues the prompt (leading spaces kept), special tokens left out."""
        return self._continuation(p.ids, p.new_ids)

    def piece(self, p: Prompt) -> str:
        """The text the newest token adds; held back while it ends in an incomplete character."""
        full = self._continuation(p.ids, p.new_ids)
        if full.endswith("\ufffd") and not p.done:
            return ""
        piece, p.text_sent = full[len(p.text_sent):], full
        return piece

    def _continuation(self, prompt: list[int], new: list[int]) -> str:
        context = prompt[-8:]  # enough for the tokenizer to place the first new token's space
        head = self.tokenizer.decode(context, skip_special_tokens=True)
        whole = self.tokenizer.decode(context + new, skip_special_tokens=True)
        return whole[len(head):] if whole.startswith(head) else self.tokenizer.decode(new, skip_special_tokens=True)


def _param(value) -> bool | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


class TritonPythonModel:
    """Triton Python backend entry point (see the module docstring)."""

    def initialize(self, args):
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        self.log = pb_utils.Logger
        config = json.loads(args["model_config"])
        self.name = config.get("name", args.get("model_name", "generate"))
        params = {k: v.get("string_value", "") for k, v in (config.get("parameters") or {}).items()}
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        model_dir = Path(args["model_repository"])
        folder = (model_dir / params.get("artifact", "1/artifact")).resolve()
        device = params.get("device", "cpu")
        if device == "cuda" and args.get("model_instance_kind") == "GPU":
            # one stub process per instance: show it only its own GPU before the runtime starts CUDA
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            gpu = int(args.get("model_instance_device_id", 0))
            os.environ["CUDA_VISIBLE_DEVICES"] = visible.split(",")[gpu] if visible else str(gpu)
        start = time.perf_counter()
        self.generator = Generator(folder, params.get("runtime") or None, device, params.get("dtype") or None,
                                   int(params.get("max_tokens", 512)),
                                   int(params.get("default_max_tokens", DEFAULT_MAX_TOKENS)),
                                   cuda_graph=params.get("cuda_graph", "true") != "false",
                                   batching=params.get("batching") or "auto",
                                   slots=int(config.get("max_batch_size") or 8),
                                   draft=params.get("draft_depth") or None,
                                   draft_tokens=int(params.get("draft_tokens") or 4),
                                   decode_kernels=params.get("decode_kernels") == "true")
        self.stop, self.loop, self.metrics = threading.Event(), None, {}
        if self.generator.engine is not None:
            self.metrics, why = _metrics(pb_utils, self.name)
            if why:
                self.log.log_warn(f"{self.name}: no engine metrics on /metrics: {why}")
            self.loop = threading.Thread(target=self.generator.engine.run_forever, args=(self.stop, self._observe),
                                         name="ulsexport-decode-engine", daemon=True)
            self.loop.start()
        batching = (f"continuous batching, {self.generator.slots} slots per depth" if self.generator.engine else
                    f"static batches ({self.generator.batching_off or 'asked for'})")
        self.log.log_info(f"{self.name}: {self.generator.runtime_name} runtime on {device} over {folder} "
                          f"ready in {time.perf_counter() - start:.1f} s (max_tokens {self.generator.max_tokens}, "
                          f"positions {self.generator.positions}, eos {sorted(self.generator.eos)}, "
                          f"depths {', '.join(self.generator.depths)}, default {self.generator.default_depth}; "
                          f"{batching})")

    # -- requests -------------------------------------------------------------------------------
    def _input(self, request, name):
        tensor = self.pb.get_input_tensor_by_name(request, name)
        return None if tensor is None else tensor.as_numpy()

    def _prompt(self, request) -> Prompt:
        try:
            params = json.loads(request.parameters() or "{}")
        except ValueError:
            params = {}
        stream = _param(self._input(request, "stream"))
        if stream is None:
            stream = _param(params.get("stream"))
        if stream is None:
            stream = self.decoupled  # the streaming model streams unless told not to
        if stream and not self.decoupled:
            stream = False  # the plain model answers once; generate_stream over it gets one event
        depth = self._input(request, "depth")
        if depth is None and isinstance(params.get("depth"), str):
            depth = params["depth"]  # a request parameter, where a client sends it so
        return self.generator.prompt(self._input(request, "text_input"), self._input(request, "input_ids"),
                                     self._input(request, "max_tokens"), stream, depth)

    def _response(self, ids: list[int], text: str):
        pb = self.pb
        return pb.InferenceResponse(output_tensors=[
            pb.Tensor("text_output", np.array([[text.encode("utf-8")]], dtype=np.object_)),
            pb.Tensor("output_ids", np.array([ids], dtype=np.int64).reshape(1, len(ids))),
        ])

    def _error(self, message: str):
        return self.pb.InferenceResponse(output_tensors=[], error=self.pb.TritonError(f"{self.name}: {message}"))

    def execute(self, requests):
        if self.generator.engine is not None:
            return self._execute_on_engine(requests)
        return self._execute_batch(requests)

    def _execute_on_engine(self, requests):
        """Each valid request goes to the decode engine, whose loop runs on its own thread: the streaming
        (decoupled) model returns at once and its responses go out from that thread as tokens come, so a
        request joins the running batch at the next step; the plain model waits for its requests' ends."""
        final = self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        responses: list = [None] * len(requests)
        waits = []
        for i, request in enumerate(requests):
            sender = request.get_response_sender() if self.decoupled else None
            try:
                p = self._prompt(request)
            except Exception as exc:  # every refusal is the client's to fix; the rest of the batch goes on
                message = str(exc) if isinstance(exc, RequestError) else f"{type(exc).__name__}: {exc}"
                if self.decoupled:
                    sender.send(self._error(message), flags=final)
                else:
                    responses[i] = self._error(message)
                continue
            ended, failure = threading.Event(), []

            def on_token(p, token, sender=sender, ended=ended):
                if self.metrics and len(p.new_ids) == 1:
                    self._first_token(p)
                if self.decoupled:
                    if not p.done and sender.is_cancelled():  # the client went away: this token is its last
                        self.generator.engine.cancel(p.engine_request)
                        p.done = True
                    if p.stream:
                        sender.send(self._response([token], self.generator.piece(p)), flags=final if p.done else 0)
                    elif p.done:
                        sender.send(self._response(p.new_ids, self.generator.text(p)), flags=final)
                if p.done:
                    ended.set()

            def on_error(p, exc, sender=sender, ended=ended, failure=failure):
                failure.append(f"decoding failed (depth {p.depth}): {type(exc).__name__}: {exc}")
                if self.decoupled:
                    sender.send(self._error(failure[0]), flags=final)
                ended.set()

            p.arrived = time.perf_counter()
            try:
                p.engine_request = self.generator.submit(p, on_token, on_error)
            except RequestError as exc:
                if self.decoupled:
                    sender.send(self._error(str(exc)), flags=final)
                else:
                    responses[i] = self._error(str(exc))
                continue
            waits.append((i, p, ended, failure))
        depths: dict[str, int] = {}
        for _, p, _, _ in waits:
            depths[p.depth] = depths.get(p.depth, 0) + 1
        by_depth = ", ".join(f"{d} x{n}" for d, n in depths.items())
        what = f"execute batch of {len(requests)} requests ({len(waits)} valid{'; ' + by_depth if by_depth else ''})"
        if self.decoupled:
            self.log.log_info(f"{self.name}: {what} handed to the decode engine")
            return None
        start = time.perf_counter()
        for i, p, ended, failure in waits:
            ended.wait()
            responses[i] = self._error(failure[0]) if failure else self._response(p.new_ids, self.generator.text(p))
        self.log.log_info(f"{self.name}: {what} decoded by the engine in {time.perf_counter() - start:.3f} s")
        return responses

    def _first_token(self, p: Prompt) -> None:
        self.metrics["ttft_seconds"].increment(time.perf_counter() - p.arrived)
        self.metrics["first_tokens"].increment(1)

    def _observe(self, produced: int) -> None:
        """After each engine step (its thread): the queue, the running batch and the tokens made."""
        if not self.metrics:
            return
        engine = self.generator.engine
        self.metrics["queue"].set(len(engine.waiting))
        self.metrics["running"].set(engine.running())
        self.metrics["tokens"].increment(produced)

    def _execute_batch(self, requests):
        pb = self.pb
        final = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        responses: list = [None] * len(requests)
        senders = [r.get_response_sender() for r in requests] if self.decoupled else None
        prompts, rows = [], []
        for i, request in enumerate(requests):
            try:
                prompts.append(self._prompt(request))
                rows.append(i)
            except Exception as exc:  # every refusal is the client's to fix; the rest of the batch goes on
                message = str(exc) if isinstance(exc, RequestError) else f"{type(exc).__name__}: {exc}"
                if self.decoupled:
                    senders[i].send(self._error(message), flags=final)
                else:
                    responses[i] = self._error(message)
        start, steps = time.perf_counter(), 0
        groups = self.generator.groups(prompts)
        for depth, members in groups.items():  # one batch per depth; a failing depth fails only its rows
            group = [prompts[m] for m in members]

            def on_token(row, p, token, members=members):
                if self.decoupled and p.stream:
                    sender = senders[rows[members[row]]]
                    if not p.done and sender.is_cancelled():  # the client went away: this token is its row's last
                        p.done = True
                    sender.send(self._response([token], self.generator.piece(p)), flags=final if p.done else 0)
            try:
                steps += self.generator.decode(group, on_token)
            except Exception as exc:  # a runtime failure fails this batch, not the server
                message = f"decoding failed (depth {depth}): {type(exc).__name__}: {exc}"
                for m, p in zip(members, group):
                    if self.decoupled:
                        if not p.done:
                            senders[rows[m]].send(self._error(message), flags=final)
                    else:
                        responses[rows[m]] = self._error(message)
                continue
            for m, p in zip(members, group):
                if self.decoupled and not p.stream:
                    senders[rows[m]].send(self._response(p.new_ids, self.generator.text(p)), flags=final)
                elif not self.decoupled:
                    responses[rows[m]] = self._response(p.new_ids, self.generator.text(p))
        by_depth = ", ".join(f"{d} x{len(m)}" for d, m in groups.items())
        self.log.log_info(f"{self.name}: execute batch of {len(requests)} requests ({len(rows)} valid"
                          f"{'; ' + by_depth if by_depth else ''}), "
                          f"{steps} decode steps in {time.perf_counter() - start:.3f} s")
        return None if self.decoupled else responses

    def finalize(self):
        self.stop.set()
        if self.loop is not None:
            self.loop.join(10)
        self.generator = None


def _metrics(pb_utils, model: str) -> tuple[dict, str | None]:
    """The engine's metrics beside Triton's own (its /metrics endpoint), labelled by model, and why there
    are none where the Python backend cannot make them ({}, the reason)."""
    family = getattr(pb_utils, "MetricFamily", None)
    if family is None:
        return {}, "this Python backend has no custom metrics (pb_utils.MetricFamily)"
    labels = {"model": model}
    specs = {"queue": ("ulsexport_queue_requests", "Requests waiting for a slot", family.GAUGE),
             "running": ("ulsexport_running_requests", "Requests in the running batch", family.GAUGE),
             "tokens": ("ulsexport_generated_tokens_total", "Tokens generated", family.COUNTER),
             "ttft_seconds": ("ulsexport_time_to_first_token_seconds_total",
                              "Seconds from a request's arrival at the model to its first token, summed", family.COUNTER),
             "first_tokens": ("ulsexport_first_tokens_total", "Requests that got their first token", family.COUNTER)}
    try:
        families = {key: family(name=name, description=text, kind=kind) for key, (name, text, kind) in specs.items()}
        # a Metric works only while its MetricFamily lives: the families stay beside the metrics
        return {**{key: f.Metric(labels=labels) for key, f in families.items()}, "families": families}, None
    except Exception as exc:  # custom metrics turned off in the server (--allow-metrics=false, say)
        return {}, f"{type(exc).__name__}: {exc}"

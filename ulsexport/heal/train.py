"""Healing: a short training run that gives a pruned model back the quality its removed layers held.

The student (the pruned model) learns from the teacher (the original) by knowledge distillation:
KL(teacher || student) over temperature-softened next-token distributions, scaled by T^2. The
plain language-model loss on the training text (`lm`), or a weighted mix (`kd+lm`), are offered
too. Training is AdamW with a warm-up then cosine schedule; LoRA (`peft`) is offered for models
whose full training does not fit beside the teacher, and is merged into the weights when saved.

KD asks for a student derived from the teacher: its ulsexport.json must name the teacher's
config.json by sha256 (`source_config_sha256`, written by `ulsexport prune` and kept through
healing), and a student not yet healed must hold, in its first layer, the exact weights of the
teacher's layer it came from (one matrix is compared: cheap, where comparing every kept layer
would read the whole teacher). The hash alone would not do: a base model and its fine-tunes
often share config.json byte for byte.

Checkpoints (trainable weights, optimizer, schedule, step, data position) go to
`<out>.work/checkpoints/`, each written to a temporary file and renamed, so an interrupted run
always leaves the last complete one for `resume=True`. The data stream is deterministic
(seeded), so a resumed run replays it to the saved position and sees exactly the windows the
uninterrupted run would have seen. The output is written through atomic_output_dir and the
work directory is removed once it is in place.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .. import checkpoint as ckpt
from ..families import adapter_for
from .corpus import array_windows, check_corpus, corpus_files, corpus_sha256, mixture_windows, training_windows
from . import distributed
from .distributed import World, world_from_env
from .samples import SampleSettings, teacher_samples
from ..errors import UserError
from ..artifact import Artifact, file_sha256, write_manifest
from ..models import load_causal_lm, transformers_bars
from ..tokenizer import load_tokenizer
from ..precision import resolve_device
from ..outputs import atomic_output_dir, check_output_dir, resolve_path
from ..progress import progress_bar
from ..checkpoint import load_model_info
from ..quality import EVAL_SEED_OFFSET, domain_windows, generality, prepare_generality

LOSSES = ("kd", "lm", "kd+lm")
TRAIN_DTYPES = ("fp32", "bf16")
EVAL_MAX_TOKENS = 200_000
CHECKPOINT_PREFIX = "step-"
MAX_LR = 1.0   # an AdamW learning rate above 1 turns the weights to noise within a step
MAX_AUTO_SAMPLES = 4096   # teacher samples made when no count is given (fewer if the run draws fewer)
WORK_MARKER = ".ulsexport-work"   # in <out>.work/: ulsexport made this folder, so it may empty it

# Settings a resumed run must share with the run that wrote the checkpoint.
RESUME_KEYS = ("depths", "loss", "kd_weight", "hidden_weight", "temperature", "steps", "batch", "seq_len", "lr", "warmup_steps",
               "lora_rank", "seed", "dtype", "data_sha256", "student_config_sha256")


@dataclass(frozen=True)
class HealResult:
    out_dir: Path
    manifest: dict
    losses: list[float]     # training loss of every step, 1..steps (including steps before a resume)
    seconds: float


def work_dir(out: str | Path) -> Path:
    """Where checkpoints of a run towards `out` live: `<out>.work/` beside it."""
    out = Path(out).absolute()
    return out.with_name(out.name + ".work")


def claim_work_dir(out: str | Path, protect=()) -> Path:
    """`<out>.work/`, made with ulsexport's marker. A folder of that name that ulsexport did not make
    (no marker), or one that is an input or lies inside one, is refused: it is the user's."""
    work = work_dir(out)
    for src in (resolve_path(p) for p in protect if p is not None):
        if resolve_path(work) == src or src in resolve_path(work).parents:
            raise UserError(f"the work folder {work} of --out {out} would be the input {src} or lie inside it; "
                            "choose another --out")
    if work.exists() and not (work / WORK_MARKER).is_file():
        raise UserError(f"{work} exists and was not made by ulsexport (no {WORK_MARKER} in it); "
                        "move it away or choose another --out")
    try:
        work.mkdir(parents=True, exist_ok=True)
        (work / WORK_MARKER).touch()
    except OSError as exc:
        raise UserError(f"could not make the work folder {work}: {exc.strerror or exc}") from None
    return work


def release_work_dir(work: Path) -> None:
    """Remove the work folder if nothing but the marker is left in it."""
    if work.is_dir() and [p.name for p in work.iterdir()] == [WORK_MARKER]:
        (work / WORK_MARKER).unlink()
        work.rmdir()


def distillation_loss(student_logits, teacher_logits, temperature: float):
    """T^2 * mean over tokens of KL(softmax(teacher/T) || softmax(student/T))."""
    import torch.nn.functional as F

    vocab = student_logits.shape[-1]
    s = F.log_softmax(student_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2


def hidden_state_loss(student_hidden, teacher_hidden, kept):
    """Mean over the student's layers but its last of ||s - t||^2 / ||t||^2, where t is the output of the
    teacher layer the student layer was (kept[i]); the last layer's output is the final norm's input in
    one model and not the other, and the logits' loss covers it."""
    terms = [((student_hidden[i + 1].float() - teacher_hidden[layer + 1].float()) ** 2).mean()
             / teacher_hidden[layer + 1].float().pow(2).mean().clamp_min(1e-12)
             for i, layer in enumerate(kept[:-1])]
    return sum(terms) / len(terms) if terms else student_hidden[-1].sum() * 0


def next_token_loss(logits, ids):
    import torch.nn.functional as F

    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@dataclass(frozen=True)
class HealSettings:
    """How a healing run trains and what it measures: the one declaration of heal's settings. The CLI's
    options, a recipe's `heal:` section and heal()'s keyword arguments all build one (their defaults are
    these); `tests/test_recipe.py` checks that the three name the same fields."""
    loss: str = "kd"                  # kd, lm or kd+lm
    kd_weight: float = 0.5            # weight of kd in kd+lm
    hidden_weight: float = 0.0        # hidden-state distillation beside kd
    temperature: float = 1.0
    steps: int = 600
    batch: int = 32                   # windows per step (over all processes)
    seq_len: int = 256
    lr: float = 5e-4
    warmup_steps: int | None = None   # None: steps // 20
    lora_rank: int | None = None
    device: str | None = None         # None: cuda where available
    dtype: str = "fp32"
    data_weights: tuple[float, ...] | None = None
    teacher_samples: int | None = None
    teacher_weight: float = 0.5
    sample_temperature: float = 1.0   # the temperature the teacher samples its windows at
    eval_tokens: int = EVAL_MAX_TOKENS
    eval_samples: int = 32
    save_every: int = 100
    seed: int = 0
    speedups: tuple[float, ...] | None = None   # joint healing
    strategy: str = "uls"                        # joint healing's plans
    calib: Path | None = None                    # their calibration text


def heal(teacher: str | Path | None, student: str | Path | None, data, out: str | Path,
         settings: HealSettings | None = None, *, eval_text=None, resume: bool = False, force: bool = False,
         quiet: bool = False, on_step: Callable[[int, float], None] | None = None, **fields) -> HealResult:
    """Train `student` towards `teacher` on `data` and write the result to `out`.

    `loss`: "kd" (distillation), "lm" (next-token cross-entropy; the teacher is then optional) or
    "kd+lm" (kd_weight * kd + (1 - kd_weight) * lm). `dtype` "bf16" runs forward passes under
    bf16 autocast and holds the teacher (and a LoRA student's frozen base) in bf16; the student's
    trained weights stay fp32 and are saved in the dtype the student was stored in.
    `on_step(step, loss)` is called after every optimizer step. `settings` (a HealSettings; `fields`
    replace any of its fields, so `heal(..., steps=100)` works too) says how it trains.

    Data: `data` is one source or a list (text or JSONL files, or folders), mixed window by window in
    the proportions `data_weights` (equal by default). With a teacher, a share `teacher_weight` of the
    windows are text the teacher samples (`samples.py`: unconditional, continuations of the user's
    documents, chat dialogues where there is a chat template), `teacher_samples` of them (None: as many
    as the run uses, at most 4096; 0: none), so the student keeps the teacher's general behaviour and not
    only the user's text. Evaluation: `eval_text` is one held-out text or a list (one per domain); with
    a teacher the record holds the generality table (`quality.generality`) of the teacher, the student
    before and the student after: perplexity per domain, top-1 agreement with the teacher on
    `eval_samples` windows it sampled (other seeds than the training samples), and, where the tokenizer
    has a chat template, the greedy chat answers' agreement with the teacher's.

    `hidden_weight` > 0 adds hidden-state distillation to kd: that weight times the normalised squared
    distance between each kept layer's output and the output of the teacher layer it was.

    Joint healing (`speedups`, e.g. [2, 3]; 1 is the full depth): one set of weights for several
    depths. The student starts as the teacher itself (`student` is then the teacher, or None), holds every
    layer, and each step trains one depth in turn (round robin over the plans made with `strategy`),
    forward through that depth's kept layers only, distilled against the full teacher. Layers no depth
    keeps stay as they were. The output is a checkpoint of the original depth whose manifest records the
    plan of every trained depth (`trained_depths`), which `ulsexport prune --speedup` and
    `ulsexport onnx --speedups` then reuse.

    Under torchrun (`ulsexport heal --nproc N`), each process runs this function as one rank of an FSDP2
    run (`distributed.py`): the same windows and output as one process, the work shared.
    """
    settings = dataclasses.replace(settings or HealSettings(), **fields)
    world = world_from_env()
    quiet = quiet or not world.leader
    try:
        with distributed.only_leader_prints(world):
            return _heal(world, teacher, student, data, out, eval_text=eval_text, resume=resume, force=force,
                         quiet=quiet, on_step=on_step, **dataclasses.asdict(settings))
    finally:
        if world.distributed:
            distributed.shutdown()


def _heal(world: World, teacher, student, data, out, *, loss, kd_weight, temperature, steps, batch, seq_len, lr,
          warmup_steps, lora_rank, device, dtype, eval_text, resume, save_every, seed, quiet, force, on_step,
          speedups, strategy, calib, data_weights, teacher_samples, teacher_weight, eval_samples, eval_tokens,
          hidden_weight, sample_temperature) -> HealResult:
    start = time.perf_counter()
    weight_kd = {"kd": 1.0, "lm": 0.0}.get(loss, kd_weight)
    warmup_steps = steps // 20 if warmup_steps is None else warmup_steps
    data, eval_texts = _paths(data), _paths(eval_text)
    data_weights = _data_weights(data, data_weights)
    _check_settings(loss, kd_weight, temperature, steps, batch, seq_len, lr, warmup_steps, lora_rank,
                    dtype, save_every, teacher_samples, teacher_weight, eval_samples)
    if not (_finite(hidden_weight) and 0 <= hidden_weight <= 100):
        raise UserError(f"--hidden-weight {hidden_weight} must be between 0 and 100")
    if not (_finite(sample_temperature) and 0 < sample_temperature <= 10):
        raise UserError(f"--sample-temperature {sample_temperature} must be above 0 and at most 10")
    if hidden_weight and weight_kd == 0:
        raise UserError("--hidden-weight distils the teacher's hidden states: it needs --loss kd or kd+lm")
    distributed.local_rows(world, batch)   # refuses a batch the ranks cannot share evenly
    depths = None
    if speedups:
        if teacher is None:
            raise UserError("joint healing (--speedups) needs --teacher: the original model, which it starts from")
        student = student or teacher
        depths = _trained_depths(teacher, speedups, strategy, calib, quiet)
    student_dir, student_config, _ = load_model_info(student)
    if depths and load_model_info(teacher)[0].resolve() != student_dir.resolve():
        raise UserError("joint healing starts from the teacher itself: give --teacher only (or --student the same)")
    teacher_dir = load_model_info(teacher)[0] if depths else _check_teacher(teacher, student_dir, student_config,
                                                                            needs_teacher=weight_kd > 0)
    protect = (student_dir, *(p for p in (teacher_dir, *data, *eval_texts) if p))
    if world.leader:
        check_output_dir(out, force, protect)  # before the data is read and the models loaded
    sources = [corpus_files(d) for d in data]
    tokenizer = load_tokenizer(student_dir)
    for files in sources:
        check_corpus(tokenizer, files, seq_len)
    hashes = [corpus_sha256(files) for files in sources]   # read once: the run's key, the samples' keys
    if not 2 <= eval_tokens <= 100_000_000:
        raise UserError(f"--eval-tokens {eval_tokens} must be between 2 and 100000000")
    domains = domain_windows(tokenizer, eval_texts, eval_tokens, seq_len) if eval_texts else {}
    if lora_rank:
        _require_peft()
    import torch

    device = resolve_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if world.distributed:
        device = distributed.init(world, device)
    samples = (SampleSettings(_sample_count(teacher_samples, steps, batch, teacher_weight), seq_len,
                              temperature=sample_temperature, seed=seed)
               if teacher_dir and teacher_weight > 0 and (teacher_samples or teacher_samples is None and weight_kd > 0)
               else None)
    run = {"loss": loss, "kd_weight": weight_kd, "temperature": temperature, "steps": steps, "batch": batch,
           "seq_len": seq_len, "lr": lr, "warmup_steps": warmup_steps, "lora_rank": lora_rank, "seed": seed,
           "dtype": dtype, "data_sha256": _mixture_sha256(hashes, data_weights, samples, teacher_weight),
           "student_config_sha256": file_sha256(student_dir / ckpt.CONFIG_NAME),
           "depths": [d["kept"] for d in depths] if depths else None, "hidden_weight": hidden_weight,
           "kept": Artifact.open(student_dir).kept if hidden_weight and not depths else None}
    work = claim_work_dir(out, protect) if world.leader else work_dir(out)
    checkpoints = work / "checkpoints"
    output = atomic_output_dir(Path(out), force, protect=protect) if world.leader else contextlib.nullcontext()
    try:  # checkpoints stay for --resume if the run fails; an empty work folder goes
        with output as tmp, transformers_bars(False):
            saved = _starting_checkpoint(checkpoints, resume, force, run) if world.leader else None
            saved = _share_checkpoint(world, saved)
            teacher_model = _load_teacher(world, teacher_dir, dtype, device) if teacher_dir else None
            mixture, sample_record = _mixture(tokenizer, sources, hashes, data_weights, seq_len, teacher_model,
                                              teacher_dir, samples, teacher_weight, quiet, world)
            evaluation = _evaluation(teacher_model, tokenizer, teacher_dir, sources[0], hashes[0], domains,
                                     eval_samples, seq_len, seed, quiet, world)
            model = _load_student(student_dir, lora_rank, dtype, device, world)
            if saved:
                # checkpoints of earlier versions hold no quality rows
                before, teacher_row = saved.get("quality_before"), saved.get("quality_teacher")
            else:
                before = _depth_quality(model, evaluation, depths, quiet, "student before")
                teacher_row = _quality(teacher_model, evaluation, quiet, "teacher") if teacher_model else None
            if weight_kd == 0:
                del teacher_model
                teacher_model = None
            losses, train_seconds = _train(model, teacher_model, mixture, run, device, checkpoints,
                                           saved, save_every, quiet, on_step,
                                           extra={"quality_before": before, "quality_teacher": teacher_row},
                                           world=world)
            del teacher_model
            model.eval()
            after = _depth_quality(model, evaluation, depths, quiet, "student after")
            manifest = _manifest(student_dir, teacher_dir, data, data_weights, eval_texts, domains, evaluation, run,
                                 before, after, teacher_row, sample_record, losses, train_seconds,
                                 time.perf_counter() - start, device, world)
            if depths:
                manifest["trained_depths"] = [
                    {**d, "perplexity_before": _first_ppl(before[i]), "perplexity_after": _first_ppl(after[i]),
                     "quality_before": before[i], "quality_after": after[i]} for i, d in enumerate(depths)]
                manifest["healing"].update(mode="joint", perplexity_before=None, perplexity_after=None,
                                           quality_before=None, quality_after=None)
            if world.distributed:
                model = _gathered_student(world, model, student_dir, lora_rank, dtype)
            if world.leader:
                _save(model, lora_rank, student_dir, student_config, tmp, manifest)
        if world.leader:
            shutil.rmtree(checkpoints, ignore_errors=True)
    finally:
        if world.leader:
            release_work_dir(work)
    distributed.barrier(world)   # the output is in place before any rank returns
    return HealResult(Path(out), manifest, losses, manifest["healing"]["seconds"])


def _paths(value) -> list[Path]:
    """One path or several (a list or tuple), as a list; none for None."""
    if value is None:
        return []
    return [Path(v) for v in value] if isinstance(value, (list, tuple)) else [Path(value)]


def _data_weights(data: list[Path], weights) -> list[float]:
    if not data:
        raise UserError("give at least one --data source")
    if weights is None:
        return [1.0] * len(data)
    weights = list(weights)
    if len(weights) != len(data):
        raise UserError(f"--data-weights gives {len(weights)} weights for {len(data)} --data sources")
    if not all(_finite(w) and w >= 0 for w in weights) or not sum(weights) > 0:
        raise UserError(f"--data-weights {','.join(map(str, weights))}: weights must be non-negative numbers, "
                        "not all zero")
    return [float(w) for w in weights]


def _sample_count(requested: int | None, steps: int, batch: int, weight: float) -> int:
    """As many teacher samples as the run draws (at most MAX_AUTO_SAMPLES) unless a count is given."""
    return requested if requested is not None else max(1, min(MAX_AUTO_SAMPLES, math.ceil(steps * batch * weight)))


def _mixture_sha256(hashes, weights, samples, teacher_weight) -> str:
    """What the training stream depends on: each source's contents (`hashes`) and weight, and the samples'
    settings."""
    if len(hashes) == 1 and samples is None:
        return hashes[0]  # a single source keeps the hash earlier runs recorded
    parts = [f"{digest}:{w}" for digest, w in zip(hashes, weights)]
    if samples:
        parts.append(f"teacher:{teacher_weight}:{json.dumps(samples.record(), sort_keys=True)}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _mixture(tokenizer, sources, hashes, weights, seq_len, teacher_model, teacher_dir, samples, teacher_weight,
             quiet, world: World = World()):
    """(windows(seed, skip): the endless training stream, the teacher samples' record for the manifest)."""
    streams = [functools.partial(training_windows, tokenizer, files, seq_len) for files in sources]
    record = None
    if samples:
        array, record = teacher_samples(teacher_model, tokenizer, teacher_dir, sources[0],
                                        hashes[0], samples, quiet, world)
        record["weight"] = teacher_weight
        weights = [w / sum(weights) * (1 - teacher_weight) for w in weights] + [teacher_weight]
        streams.append(functools.partial(array_windows, array))
    return functools.partial(mixture_windows, streams, weights), record


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_settings(loss, kd_weight, temperature, steps, batch, seq_len, lr, warmup_steps, lora_rank,
                    dtype, save_every, teacher_samples=None, teacher_weight=0.5, eval_samples=0):
    problems = [
        (loss not in LOSSES, f"--loss '{loss}' is not one of {', '.join(LOSSES)}"),
        (not (_finite(kd_weight) and 0 <= kd_weight <= 1), f"--kd-weight {kd_weight} is not between 0 and 1"),
        (not (_finite(temperature) and temperature > 0), f"--temperature {temperature} must be positive (and finite)"),
        (steps < 1 or batch < 1 or save_every < 1, "--steps, --batch and --save-every must be at least 1"),
        (seq_len < 2, f"--seq-len {seq_len} must be at least 2"),
        (not (_finite(lr) and 0 < lr <= MAX_LR),
         f"--lr {lr} must be a positive number no larger than {MAX_LR:g} (AdamW diverges at once above it)"),
        (not 0 <= warmup_steps < max(steps, 1), "warm-up steps must be fewer than --steps"),
        (lora_rank is not None and lora_rank < 1, f"--lora-rank {lora_rank} must be at least 1"),
        (dtype not in TRAIN_DTYPES, f"--dtype '{dtype}' is not one of {', '.join(TRAIN_DTYPES)}"),
        (teacher_samples is not None and not 0 <= teacher_samples <= 10_000_000,
         f"--teacher-samples {teacher_samples} must be between 0 and 10000000"),
        (not (_finite(teacher_weight) and 0 <= teacher_weight < 1),
         f"--teacher-weight {teacher_weight} must be at least 0 and below 1 (the user's text keeps a share)"),
        (not 0 <= eval_samples <= 100_000, f"--eval-samples {eval_samples} must be between 0 and 100000"),
    ]
    for bad, message in problems:
        if bad:
            raise UserError(message)


def _check_teacher(teacher, student_dir: Path, student_config: dict, needs_teacher: bool) -> Path | None:
    """The teacher's directory, refused if it cannot teach this student."""
    if teacher is None:
        if needs_teacher:
            raise UserError("distillation (--loss kd or kd+lm) needs --teacher, the model the student was pruned from")
        return None
    teacher_dir, teacher_config, _ = load_model_info(teacher)
    if teacher_config["model_type"] != student_config["model_type"]:
        raise UserError(f"the teacher is a '{teacher_config['model_type']}' model and the student a "
                        f"'{student_config['model_type']}' one; healing needs one family")
    if teacher_config.get("vocab_size") != student_config.get("vocab_size") or not _same_tokenizer(
            teacher_dir, student_dir):
        raise UserError(f"the teacher {teacher_dir} and the student {student_dir} have different vocabularies")
    if needs_teacher:
        manifest = Artifact.open(student_dir).manifest
        if "source_config_sha256" not in manifest:
            raise UserError(f"the student {student_dir} has no ulsexport.json naming its source model; "
                            "distil only a model made by `ulsexport prune`, or use --loss lm")
        if (manifest["source_config_sha256"] != file_sha256(teacher_dir / ckpt.CONFIG_NAME)
                or "healing" not in manifest and not _first_layer_matches(teacher_dir, student_dir, manifest)):
            raise UserError(f"the student {student_dir} was not pruned from the teacher {teacher_dir} "
                            "(its ulsexport.json names another config.json, or its layers hold other weights)")
    return teacher_dir


def _first_layer_matches(teacher_dir: Path, student_dir: Path, manifest: dict) -> bool:
    """The smallest matrix of the student's first layer equals the teacher's layer it came from."""
    import torch

    adapter = adapter_for(ckpt.read_config(student_dir))
    student_infos = [i for i in ckpt.checkpoint_tensors(student_dir)
                     if adapter.layer_index(i.name) == 0 and len(i.shape) >= 2]
    if not student_infos:
        return False
    smallest = min(student_infos, key=lambda i: i.nbytes)
    source_name = adapter.rename_layer(smallest.name, manifest["kept"][0])
    teacher_info = next((i for i in ckpt.checkpoint_tensors(teacher_dir) if i.name == source_name), None)
    return teacher_info is not None and torch.equal(ckpt.read_tensor(smallest), ckpt.read_tensor(teacher_info))


def _same_tokenizer(teacher_dir: Path, student_dir: Path) -> bool:
    """False only when both have tokenizers and their vocabularies differ."""
    try:
        return load_tokenizer(teacher_dir).get_vocab() == load_tokenizer(student_dir).get_vocab()
    except UserError:
        return True


def _require_peft():
    try:
        import peft  # noqa: F401
    except ImportError:
        raise UserError("--lora-rank needs peft: pip install 'ulsexport[heal]'") from None


def _starting_checkpoint(checkpoints: Path, resume: bool, force: bool, run: dict) -> dict | None:
    latest = _latest_checkpoint(checkpoints)
    if not resume:
        if latest and not force:
            raise UserError(f"{checkpoints} holds a checkpoint of an earlier run; pass --resume to "
                            "continue it or --force to start over")
        shutil.rmtree(checkpoints, ignore_errors=True)
        return None
    if latest is None:
        raise UserError(f"--resume: there is no checkpoint in {checkpoints}")
    import torch

    try:
        saved = torch.load(latest, map_location="cpu", weights_only=True)
        earlier = saved["run"]
    except Exception as exc:  # a truncated or foreign file: torch raises RuntimeError, pickle errors, KeyError
        raise UserError(f"--resume: {latest} is not a complete healing checkpoint ({type(exc).__name__}); "
                        "rerun without --resume and with --force to start over") from None
    defaults = {"hidden_weight": 0.0}   # checkpoints of earlier versions lack it
    changed = [f"{k}={earlier.get(k)}" for k in RESUME_KEYS if earlier.get(k, defaults.get(k)) != run[k]]
    if changed:
        raise UserError(f"--resume: the checkpoint was made with other settings ({', '.join(changed)})")
    return saved


def _latest_checkpoint(checkpoints: Path) -> Path | None:
    found = sorted(checkpoints.glob(f"{CHECKPOINT_PREFIX}*.pt")) if checkpoints.is_dir() else []
    return found[-1] if found else None


def _write_checkpoint(checkpoints: Path, step: int, state: dict) -> Path:
    import torch

    checkpoints.mkdir(parents=True, exist_ok=True)
    final = checkpoints / f"{CHECKPOINT_PREFIX}{step:08d}.pt"
    tmp = checkpoints / f".{final.name}.tmp"
    try:
        torch.save(state, tmp)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    for older in checkpoints.glob(f"{CHECKPOINT_PREFIX}*.pt"):
        if older != final:
            older.unlink()
    return final


def _load_student(student_dir: Path, lora_rank: int | None, dtype: str, device: str, world: World = World()):
    """Full training keeps fp32 master weights; LoRA freezes a base held in `dtype`. Several ranks: sharded."""
    held = dtype if lora_rank else "fp32"
    wrap = functools.partial(_lora, lora_rank) if lora_rank else None
    if world.distributed:
        return distributed.load_sharded(world, lambda: load_causal_lm(student_dir, held, "cpu"), student_dir,
                                        held, device, wrap).train()
    model = load_causal_lm(student_dir, held, device)
    return (wrap(model) if wrap else model).train()


def _lora(rank: int, model):
    """LoRA adapters on every linear layer, initialised from a fixed seed (the same on any number of ranks)."""
    import torch
    from peft import LoraConfig, get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                target_modules="all-linear"))


def _load_teacher(world: World, teacher_dir: Path, dtype: str, device: str):
    if not world.distributed:
        return load_causal_lm(teacher_dir, dtype, device)
    model = distributed.load_sharded(world, lambda: load_causal_lm(teacher_dir, dtype, "cpu"), teacher_dir,
                                     dtype, device).eval()
    model.requires_grad_(False)
    return model


def _share_checkpoint(world: World, saved: dict | None) -> dict | None:
    """The leader's checkpoint for every rank: the other ranks get all of it but the weights and optimizer
    state, which reach their shards from the leader (`distributed.load_full_state`)."""
    if not world.distributed:
        return saved
    light = {k: v for k, v in saved.items() if k not in ("trainable", "optimizer")} if saved else None
    light = distributed.broadcast_object(world, light)
    return saved if world.leader else light


def _gathered_student(world: World, model, student_dir: Path, lora_rank, dtype: str):
    """The trained weights of every rank in one CPU model on the leader (None elsewhere), to be saved."""
    weights, _ = distributed.full_state(world, model, trainable_only=False)
    if not world.leader:
        return None
    whole = _load_student(student_dir, lora_rank, dtype, "cpu")
    whole.load_state_dict(weights)
    return whole


def _schedule(step: int, warmup: int, steps: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _train(model, teacher, mixture, run, device, checkpoints, saved, save_every, quiet, on_step,
           extra, world: World = World()) -> tuple[list[float], float]:
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=run["lr"], betas=(0.9, 0.95), weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _schedule(s, run["warmup_steps"], run["steps"]))
    step, losses, seconds = 0, [], 0.0
    if saved:
        _restore(world, model, optimizer, saved)
        scheduler.load_state_dict(saved["scheduler"])
        step, losses, seconds = saved["step"], list(saved["losses"]), saved["seconds"]
    batch, steps = run["batch"], run["steps"]
    mine = distributed.local_rows(world, batch)
    windows = mixture(run["seed"], skip=step * batch)
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=run["dtype"] == "bf16")
    started = time.perf_counter()
    try:
        with progress_bar(steps, "healing", unit="step", quiet=quiet) as bar:
            bar.update(step)
            while step < steps:
                ids = torch.tensor([next(windows) for _ in range(batch)][mine], device=device)
                depth = run["depths"][step % len(run["depths"])] if run.get("depths") else None
                with autocast, _only(model, depth):
                    value = _objective(model, teacher, ids, run, depth)
                shown = distributed.mean(world, value.detach())   # every rank sees the same loss
                if not torch.isfinite(shown).all():
                    raise UserError(f"healing stopped at step {step + 1} of {steps}: the loss became "
                                    f"{shown.item()} (the training diverged; try a lower --lr); "
                                    "no output was written")
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                scheduler.step()
                step += 1
                losses.append(shown.item())
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
                if step % save_every == 0 or step == steps:
                    trainable, optim = distributed.full_state(world, model, optimizer)
                    if world.leader:
                        _write_checkpoint(checkpoints, step, {
                            "run": run, "step": step, "windows": step * batch, "losses": losses,
                            "seconds": seconds + time.perf_counter() - started, **extra,
                            "trainable": trainable, "optimizer": optim, "scheduler": scheduler.state_dict(),
                            "world_size": world.size})
                if on_step:
                    on_step(step, losses[-1])
    except KeyboardInterrupt:
        latest = _latest_checkpoint(checkpoints)
        where = f"the last complete checkpoint is {latest}" if latest else "no checkpoint was written yet"
        print(f"healing interrupted at step {step}; {where}; rerun with --resume to continue", file=sys.stderr)
        raise
    return losses, seconds + time.perf_counter() - started


def _restore(world: World, model, optimizer, saved: dict) -> None:
    """A checkpoint's weights and optimizer state, from any world size (the leader holds them)."""
    optim = saved.get("optimizer")
    if not world.distributed and optim and all(isinstance(k, int) for k in optim.get("state", {})):
        import torch   # a checkpoint of an earlier version: optimizer state keyed by position

        trainable = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
        with torch.no_grad():
            for name, value in saved["trainable"].items():
                trainable[name].copy_(value)
        optimizer.load_state_dict(optim)
        return
    distributed.load_full_state(world, model, optimizer, saved.get("trainable"), optim)


def _only(model, kept):
    """The model with only the `kept` layers for a block (all of them for None)."""
    from ..plan.scoring import kept_layers_only

    return kept_layers_only(model, kept) if kept is not None else contextlib.nullcontext(model)


def _trained_depths(teacher, speedups, strategy: str, calib, quiet: bool) -> list[dict]:
    """The plan of every depth joint healing trains: speedup 1 keeps every layer."""
    from ..plan.scoring import depth_plans

    depths = [{"speedup": s, "strategy": plan.strategy, "kept": list(plan.kept), "plan": plan.to_dict()}
              for s, plan in depth_plans(teacher, speedups, strategy, calib, quiet=quiet)]
    if len({tuple(d["kept"]) for d in depths}) != len(depths):
        raise UserError("--speedups: two speedups keep the same layers; give each depth once")
    return depths


def _evaluation(teacher, tokenizer, teacher_dir, files, files_sha256, domains, eval_samples, seq_len, seed, quiet,
                world: World = World()):
    """What the generality table is measured on (None without held-out text): the domains, and with a
    teacher, windows it samples with another seed than training's, and its chat answers."""
    if not domains:
        return None
    sampled = []
    if teacher is not None and eval_samples:
        settings = SampleSettings(eval_samples, seq_len, seed=seed + EVAL_SEED_OFFSET)
        array, _ = teacher_samples(teacher, tokenizer, teacher_dir, files, files_sha256, settings, quiet, world)
        sampled = array.tolist()
    return prepare_generality(teacher, tokenizer, domains, sampled, chat=teacher is not None)


def _quality(model, evaluation, quiet: bool, what: str) -> dict | None:
    if evaluation is None:
        return None
    return generality(model, evaluation, None if quiet else f"the {what} ({', '.join(evaluation.domains)})")


def _depth_quality(model, evaluation, depths, quiet: bool, what: str):
    """The model's generality row, or one per trained depth (a list, in the order of `depths`)."""
    if not depths:
        return _quality(model, evaluation, quiet, what)
    rows = []
    for depth in depths:
        with _only(model, depth["kept"]):
            rows.append(_quality(model, evaluation, quiet, f"{what}, {depth['speedup']:g}x"))
    return rows


def _first_ppl(row: dict | None):
    """The perplexity on the first held-out text (the single figure earlier records kept)."""
    return next(iter(row["perplexity"].values())) if row else None


def _objective(model, teacher, ids, run, depth=None):
    import torch

    hidden = bool(run.get("hidden_weight"))
    out = model(input_ids=ids, use_cache=False, output_hidden_states=hidden)
    logits = out.logits
    value = 0.0
    if run["kd_weight"] > 0:
        with torch.no_grad():
            teacher_out = teacher(input_ids=ids, use_cache=False, output_hidden_states=hidden)
        value = run["kd_weight"] * distillation_loss(logits, teacher_out.logits, run["temperature"])
        if hidden:
            kept = depth if depth is not None else run.get("kept") or list(range(len(out.hidden_states) - 1))
            value = value + run["hidden_weight"] * hidden_state_loss(out.hidden_states, teacher_out.hidden_states,
                                                                     kept)
    if run["kd_weight"] < 1:
        value = value + (1 - run["kd_weight"]) * next_token_loss(logits, ids)
    return value


def _manifest(student_dir, teacher_dir, data, data_weights, eval_texts, domains, evaluation, run, before, after,
              teacher_row, sample_record, losses, train_seconds, seconds, device, world: World = World()) -> dict:
    manifest = dict(Artifact.open(student_dir).record or {"kind": "hf-checkpoint"})
    for written_by_write_manifest in ("tool", "version"):
        manifest.pop(written_by_write_manifest, None)
    record = {k: run[k] for k in ("loss", "temperature", "steps", "batch", "seq_len", "lr", "warmup_steps",
                                  "lora_rank", "seed", "dtype", "data_sha256")}
    if run["loss"] == "kd+lm":
        record["kd_weight"] = run["kd_weight"]
    if run.get("hidden_weight"):
        record["hidden_weight"] = run["hidden_weight"]
    first = eval_texts[0] if eval_texts else None
    record.update({
        "teacher": str(teacher_dir.absolute()) if teacher_dir else None,
        "student": str(Path(student_dir).absolute()),
        "data": str(Path(data[0]).absolute()) if len(data) == 1 else [str(Path(d).absolute()) for d in data],
        "data_weights": data_weights if len(data) > 1 else None,
        "teacher_samples": sample_record,
        "eval_text": str(Path(first).absolute()) if first else None,
        "eval_texts": [str(Path(t).absolute()) for t in eval_texts] or None,
        "eval_tokens": sum(len(w) for w in next(iter(domains.values()))) if domains else None,
        "evaluation": evaluation.describe() if evaluation else None,
        "perplexity_before": _first_ppl(before) if isinstance(before, dict) else None,
        "perplexity_after": _first_ppl(after) if isinstance(after, dict) else None,
        "teacher_perplexity": _first_ppl(teacher_row),
        "quality_teacher": teacher_row,
        "quality_before": before if isinstance(before, dict) else None,
        "quality_after": after if isinstance(after, dict) else None,
        "final_train_loss": losses[-1],
        "train_seconds": round(train_seconds, 2),
        "seconds": round(seconds, 2),
        "tokens": run["steps"] * run["batch"] * run["seq_len"],
        "device": device,
        "peak_memory_mib": distributed.maximum(world, _peak_memory_mib(device) or 0.0) or None,
    })
    if world.distributed:
        record["processes"] = world.size   # peak_memory_mib: the largest of any one process
    if "healing" in manifest:
        record["previous"] = manifest["healing"]
    manifest["healing"] = record
    return manifest


def quality_rows(record: dict, depths: list[dict] | None = None) -> dict[str, dict]:
    """The generality table's rows of a healing record: teacher, then before and after (per depth)."""
    rows = {"teacher": record["quality_teacher"]} if record.get("quality_teacher") else {}
    for depth in depths or [{"speedup": None, "quality_before": record.get("quality_before"),
                             "quality_after": record.get("quality_after")}]:
        label = f"{depth['speedup']:g}x ({len(depth['kept'])} layers) " if depth["speedup"] is not None else ""
        for when in ("before", "after"):
            if depth.get(f"quality_{when}"):
                rows[f"{label}{when}"] = depth[f"quality_{when}"]
    return rows


def _peak_memory_mib(device: str) -> float | None:
    """Peak memory of the run: the GPU's allocator peak on CUDA, the process's peak RSS elsewhere."""
    import torch

    if device.startswith("cuda"):
        return round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
    try:
        import resource
    except ImportError:
        return None
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _save(model, lora_rank, student_dir: Path, student_config: dict, tmp: Path, manifest: dict) -> None:
    """save_pretrained (safetensors) in the student's stored dtype, LoRA merged, plus side files."""
    if lora_rank:
        model = model.merge_and_unload()
    import torch

    stored = student_config.get("dtype") or student_config.get("torch_dtype") or "float32"
    model.to(getattr(torch, stored, torch.float32))
    model.save_pretrained(tmp)
    ckpt.copy_side_files(student_dir, tmp, skip=tuple(p.name for p in tmp.iterdir()))
    write_manifest(tmp, manifest)


def prune_and_heal(model: str | Path, out: str | Path, plan, data: str | Path, force: bool = False,
                   resume: bool = False, quiet: bool = False, **prune_options) -> HealResult:
    """Prune `model` into the work directory, then heal it against `model` into `out`."""
    from ..prune import prune_checkpoint

    inputs = (model, *_paths(data)) if Path(model).exists() else tuple(_paths(data))
    check_output_dir(out, force, inputs)
    pruned = claim_work_dir(out, inputs) / "pruned"
    prune_checkpoint(model, pruned, plan, force=True, quiet=quiet, **prune_options)
    result = heal(model, pruned, data, out, force=force, resume=resume, quiet=quiet)
    shutil.rmtree(pruned, ignore_errors=True)
    release_work_dir(work_dir(out))
    return result

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
from .corpus import check_corpus, corpus_files, corpus_sha256, training_windows
from ..errors import UserError
from ..artifact import file_sha256, read_manifest, write_manifest
from ..models import load_causal_lm, transformers_bars
from ..tokenizer import load_tokenizer
from ..precision import resolve_device
from ..outputs import atomic_output_dir, check_output_dir
from ..progress import progress_bar
from ..checkpoint import load_model_info
from ..quality import perplexity, read_text, token_windows

LOSSES = ("kd", "lm", "kd+lm")
TRAIN_DTYPES = ("fp32", "bf16")
EVAL_MAX_TOKENS = 200_000
CHECKPOINT_PREFIX = "step-"
MAX_LR = 1.0   # an AdamW learning rate above 1 turns the weights to noise within a step

# Settings a resumed run must share with the run that wrote the checkpoint.
RESUME_KEYS = ("depths", "loss", "kd_weight", "temperature", "steps", "batch", "seq_len", "lr", "warmup_steps",
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


def distillation_loss(student_logits, teacher_logits, temperature: float):
    """T^2 * mean over tokens of KL(softmax(teacher/T) || softmax(student/T))."""
    import torch.nn.functional as F

    vocab = student_logits.shape[-1]
    s = F.log_softmax(student_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2


def next_token_loss(logits, ids):
    import torch.nn.functional as F

    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def heal(teacher: str | Path | None, student: str | Path, data: str | Path, out: str | Path,
         loss: str = "kd", kd_weight: float = 0.5, temperature: float = 1.0, steps: int = 600,
         batch: int = 32, seq_len: int = 256, lr: float = 5e-4, warmup_steps: int | None = None,
         lora_rank: int | None = None, device: str | None = None, dtype: str = "fp32",
         eval_text: str | Path | None = None, resume: bool = False, save_every: int = 100,
         seed: int = 0, quiet: bool = False, force: bool = False,
         on_step: Callable[[int, float], None] | None = None, speedups=None, strategy: str = "uls",
         calib=None) -> HealResult:
    """Train `student` towards `teacher` on `data` and write the result to `out`.

    `loss`: "kd" (distillation), "lm" (next-token cross-entropy; the teacher is then optional) or
    "kd+lm" (kd_weight * kd + (1 - kd_weight) * lm). `dtype` "bf16" runs forward passes under
    bf16 autocast and holds the teacher (and a LoRA student's frozen base) in bf16; the student's
    trained weights stay fp32 and are saved in the dtype the student was stored in.
    `on_step(step, loss)` is called after every optimizer step.

    Joint healing (`speedups`, e.g. [2, 3]; 1 is the full depth): one set of weights for several
    depths. The student starts as the teacher itself (`student` is then the teacher, or None), holds every
    layer, and each step trains one depth in turn (round robin over the plans made with `strategy`),
    forward through that depth's kept layers only, distilled against the full teacher. Layers no depth
    keeps stay as they were. The output is a checkpoint of the original depth whose manifest records the
    plan of every trained depth (`trained_depths`), which `ulsexport prune --speedup` and
    `ulsexport onnx --speedups` then reuse.
    """
    start = time.perf_counter()
    weight_kd = {"kd": 1.0, "lm": 0.0}.get(loss, kd_weight)
    warmup_steps = steps // 20 if warmup_steps is None else warmup_steps
    _check_settings(loss, kd_weight, temperature, steps, batch, seq_len, lr, warmup_steps, lora_rank,
                    dtype, save_every)
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
    protect = (student_dir, *(p for p in (teacher_dir, data, eval_text) if p))
    check_output_dir(out, force, protect)  # before the data is read and the models loaded
    files = corpus_files(data)
    tokenizer = load_tokenizer(student_dir)
    check_corpus(tokenizer, files, seq_len)
    eval_windows = token_windows(tokenizer, read_text(eval_text), seq_len, EVAL_MAX_TOKENS) if eval_text else None
    if eval_text and not eval_windows:
        raise UserError(f"--eval-text {eval_text} gives fewer than 2 tokens")
    if lora_rank:
        _require_peft()
    import torch

    device = resolve_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    run = {"loss": loss, "kd_weight": weight_kd, "temperature": temperature, "steps": steps, "batch": batch,
           "seq_len": seq_len, "lr": lr, "warmup_steps": warmup_steps, "lora_rank": lora_rank, "seed": seed,
           "dtype": dtype, "data_sha256": corpus_sha256(files),
           "student_config_sha256": file_sha256(student_dir / ckpt.CONFIG_NAME),
           "depths": [d["kept"] for d in depths] if depths else None}
    checkpoints = work_dir(out) / "checkpoints"
    with atomic_output_dir(Path(out), force, protect=protect) as tmp, transformers_bars(False):
        saved = _starting_checkpoint(checkpoints, resume, force, run)
        teacher_model = load_causal_lm(teacher_dir, dtype, device) if weight_kd > 0 else None
        model = _load_student(student_dir, lora_rank, dtype, device)
        if saved:
            before, teacher_ppl = saved["perplexity_before"], saved["teacher_perplexity"]
        else:
            before = _depth_perplexities(model, eval_windows, depths) if eval_windows else None
            teacher_ppl = perplexity(teacher_model, eval_windows) if eval_windows and teacher_model else None
        losses, train_seconds = _train(model, teacher_model, tokenizer, files, run, device, checkpoints,
                                       saved, save_every, quiet, on_step,
                                       extra={"perplexity_before": before, "teacher_perplexity": teacher_ppl})
        del teacher_model
        model.eval()
        after = _depth_perplexities(model, eval_windows, depths) if eval_windows else None
        manifest = _manifest(student_dir, teacher_dir, data, eval_text, eval_windows, run, before, after,
                             teacher_ppl, losses, train_seconds, time.perf_counter() - start)
        if depths:
            manifest["trained_depths"] = [
                {**d, "perplexity_before": before[i] if before else None,
                 "perplexity_after": after[i] if after else None} for i, d in enumerate(depths)]
            manifest["healing"].update(mode="joint", perplexity_before=None, perplexity_after=None)
        _save(model, lora_rank, student_dir, student_config, tmp, manifest)
    shutil.rmtree(checkpoints, ignore_errors=True)
    _remove_if_empty(work_dir(out))
    return HealResult(Path(out), manifest, losses, manifest["healing"]["seconds"])


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_settings(loss, kd_weight, temperature, steps, batch, seq_len, lr, warmup_steps, lora_rank,
                    dtype, save_every):
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
        manifest = read_manifest(student_dir) or {}
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

    saved = torch.load(latest, map_location="cpu", weights_only=True)
    earlier = saved["run"]
    changed = [f"{k}={earlier.get(k)}" for k in RESUME_KEYS if earlier.get(k) != run[k]]
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


def _load_student(student_dir: Path, lora_rank: int | None, dtype: str, device: str):
    """Full training keeps fp32 master weights; LoRA freezes a base held in `dtype`."""
    model = load_causal_lm(student_dir, dtype if lora_rank else "fp32", device)
    if lora_rank:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                                                 target_modules="all-linear"))
    return model.train()


def _schedule(step: int, warmup: int, steps: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _train(model, teacher, tokenizer, files, run, device, checkpoints, saved, save_every, quiet, on_step,
           extra) -> tuple[list[float], float]:
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=run["lr"], betas=(0.9, 0.95), weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _schedule(s, run["warmup_steps"], run["steps"]))
    step, losses, seconds = 0, [], 0.0
    if saved:
        trainable = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
        with torch.no_grad():
            for name, value in saved["trainable"].items():
                trainable[name].copy_(value)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        step, losses, seconds = saved["step"], list(saved["losses"]), saved["seconds"]
    batch, steps = run["batch"], run["steps"]
    windows = training_windows(tokenizer, files, run["seq_len"], run["seed"], skip=step * batch)
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=run["dtype"] == "bf16")
    started = time.perf_counter()
    try:
        with progress_bar(steps, "healing", unit="step", quiet=quiet) as bar:
            bar.update(step)
            while step < steps:
                ids = torch.tensor([next(windows) for _ in range(batch)], device=device)
                depth = run["depths"][step % len(run["depths"])] if run.get("depths") else None
                with autocast, _only(model, depth):
                    value = _objective(model, teacher, ids, run)
                if not torch.isfinite(value.detach()).all():
                    raise UserError(f"healing stopped at step {step + 1} of {steps}: the loss became "
                                    f"{value.item()} (the training diverged; try a lower --lr); "
                                    "no output was written")
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                scheduler.step()
                step += 1
                losses.append(value.item())
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
                if step % save_every == 0 or step == steps:
                    _write_checkpoint(checkpoints, step, {
                        "run": run, "step": step, "windows": step * batch, "losses": losses,
                        "seconds": seconds + time.perf_counter() - started, **extra,
                        "trainable": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
                        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()})
                if on_step:
                    on_step(step, losses[-1])
    except KeyboardInterrupt:
        latest = _latest_checkpoint(checkpoints)
        where = f"the last complete checkpoint is {latest}" if latest else "no checkpoint was written yet"
        print(f"healing interrupted at step {step}; {where}; rerun with --resume to continue", file=sys.stderr)
        raise
    return losses, seconds + time.perf_counter() - started


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


def _depth_perplexities(model, windows, depths):
    """Perplexity of the model, or of each trained depth (a list, in the order of `depths`)."""
    if not depths:
        return perplexity(model, windows)
    values = []
    for depth in depths:
        with _only(model, depth["kept"]):
            values.append(perplexity(model, windows))
    return values


def _objective(model, teacher, ids, run):
    import torch

    logits = model(input_ids=ids, use_cache=False).logits
    value = 0.0
    if run["kd_weight"] > 0:
        with torch.no_grad():
            teacher_logits = teacher(input_ids=ids, use_cache=False).logits
        value = run["kd_weight"] * distillation_loss(logits, teacher_logits, run["temperature"])
    if run["kd_weight"] < 1:
        value = value + (1 - run["kd_weight"]) * next_token_loss(logits, ids)
    return value


def _manifest(student_dir, teacher_dir, data, eval_text, eval_windows, run, before, after, teacher_ppl,
              losses, train_seconds, seconds) -> dict:
    manifest = dict(read_manifest(student_dir) or {"kind": "hf-checkpoint"})
    for written_by_write_manifest in ("tool", "version"):
        manifest.pop(written_by_write_manifest, None)
    record = {k: run[k] for k in ("loss", "temperature", "steps", "batch", "seq_len", "lr", "warmup_steps",
                                  "lora_rank", "seed", "dtype", "data_sha256")}
    if run["loss"] == "kd+lm":
        record["kd_weight"] = run["kd_weight"]
    record.update({
        "teacher": str(teacher_dir.absolute()) if teacher_dir else None,
        "student": str(Path(student_dir).absolute()),
        "data": str(Path(data).absolute()),
        "eval_text": str(Path(eval_text).absolute()) if eval_text else None,
        "eval_tokens": sum(len(w) for w in eval_windows) if eval_windows else None,
        "perplexity_before": before,
        "perplexity_after": after,
        "teacher_perplexity": teacher_ppl,
        "final_train_loss": losses[-1],
        "train_seconds": round(train_seconds, 2),
        "seconds": round(seconds, 2),
    })
    if "healing" in manifest:
        record["previous"] = manifest["healing"]
    manifest["healing"] = record
    return manifest


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


def _remove_if_empty(directory: Path) -> None:
    try:
        directory.rmdir()
    except OSError:
        pass


def prune_and_heal(model: str | Path, out: str | Path, plan, data: str | Path, force: bool = False,
                   resume: bool = False, quiet: bool = False, **prune_options) -> HealResult:
    """Prune `model` into the work directory, then heal it against `model` into `out`."""
    from ..prune import prune_checkpoint

    check_output_dir(out, force, (model, data) if Path(model).exists() else (data,))
    pruned = work_dir(out) / "pruned"
    prune_checkpoint(model, pruned, plan, force=True, quiet=quiet, **prune_options)
    result = heal(model, pruned, data, out, force=force, resume=resume, quiet=quiet)
    shutil.rmtree(pruned, ignore_errors=True)
    _remove_if_empty(work_dir(out))
    return result

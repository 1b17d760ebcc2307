"""`validate --speculative`: self-speculative decoding of a multi-depth export checked against its own full
depth (the tokens must be identical: nothing else passes) and timed beside it, batch 1, interleaved."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..precision import tolerance_for
from .parity import tie
from .speed import SpeedSettings

PROMPTS = 8   # of the package's chat prompts, as plain text: realistic drafts, several lengths


def validate_speculative(candidate: Path, draft: str, draft_tokens: int, device: str, parity_steps: int,
                         speed: SpeedSettings | None, quiet: bool = False, adaptive: bool = False) -> dict:
    from ..artifact import Artifact
    from ..progress import progress_bar
    from ..quality import CHAT_PROMPTS
    from ..runtime.ort import MultiDepthDecoder
    from ..runtime.speculative import multi_token_capture_off, speculative_greedy
    from ..tokenizer import load_tokenizer

    if not Artifact.open(candidate).multi_depth:
        raise UserError(f"--speculative needs a multi-depth export (ulsexport onnx --speedups 1,2 ...); {candidate} "
                        "has one depth")
    # the fastest loops: on CUDA the full depth's captured greedy decode, and the captured speculative loop
    runtime = MultiDepthDecoder(candidate, device)
    verify = runtime.default
    runtime.decoder(draft)  # an unknown depth is refused, naming the export's
    tolerance = tolerance_for(runtime.decoder(verify).onnx["dtype"])
    tokenizer = load_tokenizer(candidate)
    texts = [t for t in CHAT_PROMPTS.read_text().splitlines() if t.strip()][:PROMPTS]
    prompts = [np.array([tokenizer(t)["input_ids"]], np.int64) for t in texts]
    mismatches, totals = [], None
    with progress_bar(len(prompts), "speculative parity", unit="prompt", quiet=quiet) as bar:
        for i, ids in enumerate(prompts):
            mask = np.ones_like(ids)
            expected = [int(t) for t in runtime.greedy(ids, mask, parity_steps, depth=verify).tokens[0]]
            run = speculative_greedy(runtime, ids, mask, parity_steps, draft, draft_tokens, verify=verify,
                                     adaptive=adaptive)
            got = run.tokens[0]
            if got != expected:
                step = next(j for j, (a, b) in enumerate(zip(got, expected)) if a != b)
                mismatches.append({"prompt": i, "step": step, "expected": expected[step], "got": got[step],
                                   **_margin(runtime, ids, verify, step, expected[step], got[step], tolerance)})
            totals = _add(totals, run)
            bar.update(1)
    loop = "captured" if totals.captured else "plain"
    report = {"kind": "speculative", "candidate": str(candidate), "device": device, "draft": draft, "verify": verify,
              "draft_tokens": draft_tokens, "adaptive": adaptive, "loop": loop,
              "verify_capture_off": multi_token_capture_off(runtime, draft, verify),
              "parity": {"passed": all(m["near_tie"] for m in mismatches), "tokens_identical": not mismatches,
                         "steps": parity_steps, "prompts": len(prompts), "tolerance": tolerance,
                         "mismatches": mismatches},
              "acceptance": {"rounds": totals.rounds, "drafted": totals.drafted, "accepted": totals.accepted,
                             "acceptance_rate": round(totals.acceptance_rate, 4),
                             "tokens_per_verify": round(totals.tokens_per_verify, 4),
                             "mean_draft_tokens": round(totals.drafted / totals.rounds, 4) if totals.rounds else 0.0}}
    if speed is not None:
        report["speed"] = _speed(runtime, prompts, draft, draft_tokens, verify, speed, quiet, adaptive)
    return report


def _margin(runtime, ids, verify: str, step: int, expected: int, got: int, tolerance: float) -> dict:
    """Where the speculative tokens part from the full depth's: the full depth's own margin between its token
    and the verify pass's choice at that step (its logits from a greedy run of its own). The verify pass
    computes several positions in one pass, through other kernels than a decode step's; at a near tie their
    rounding may choose the other token, which is precision, not a wrong token (the parity rule of
    `compare_runs`)."""
    logits = runtime.greedy(ids, np.ones_like(ids), step + 1, keep_logits=True, depth=verify).logits[step]
    return tie(np.asarray(logits, np.float64), 0, expected, got, tolerance)


def _add(totals, run):
    if totals is None:
        return run
    for name in ("rounds", "drafted", "accepted"):
        setattr(totals, name, getattr(totals, name) + getattr(run, name))
    return totals


def _speed(runtime, prompts, draft, draft_tokens, verify, speed: SpeedSettings, quiet, adaptive: bool = False) -> dict:
    """Decode tokens/s of the full depth and of the speculative loop, each in its fastest loop over the one
    runtime (captured on CUDA), each prompt run by one then the other, `runs` times after `warmup`."""
    from ..progress import progress_bar
    from ..runtime.speculative import speculative_greedy

    new = speed.new_tokens
    full_times, spec_times = [], []
    with progress_bar((speed.warmup + speed.runs) * len(prompts), "speculative timing", unit="run",
                      quiet=quiet) as bar:
        for i in range(speed.warmup + speed.runs):
            for ids in prompts:
                mask = np.ones_like(ids)
                start = time.perf_counter()
                runtime.greedy(ids, mask, new, depth=verify)
                middle = time.perf_counter()
                speculative_greedy(runtime, ids, mask, new, draft, draft_tokens, verify=verify, adaptive=adaptive)
                end = time.perf_counter()
                if i >= speed.warmup:
                    full_times.append(middle - start)
                    spec_times.append(end - middle)
                bar.update(1)
    full, spec = statistics.median(full_times), statistics.median(spec_times)
    return {"new_tokens": new, "runs": len(full_times), "full_seconds": full, "speculative_seconds": spec,
            "full_tokens_per_s": new / full, "speculative_tokens_per_s": new / spec, "speedup": full / spec,
            "note": "median over prompts and runs, each prompt timed full then speculative; batch 1"}


def speculative_markdown(report: dict) -> str:
    parity, acc = report["parity"], report["acceptance"]
    k = f"K chosen each round, at most {report['draft_tokens']}" if report.get("adaptive") else f"K = {report['draft_tokens']}"
    lines = [f"# Self-speculative decoding: draft {report['draft']}, verify {report['verify']}, {k} ({report['device']})",
             "",
             f"- parity: {'PASS' if parity['passed'] else 'FAIL'}: " + _parity_line(report),
             f"- loop: {report.get('loop', 'plain')}"
             + (f" (verify passes uncaptured: {report['verify_capture_off']})" if report.get("verify_capture_off") else ""),
             f"- acceptance rate {acc['acceptance_rate']:.3f}, {acc['tokens_per_verify']:.2f} tokens per verify pass "
             f"({acc['rounds']} passes, {acc['mean_draft_tokens']:.2f} drafted per pass)"]
    if "speed" in report:
        s = report["speed"]
        lines.append(f"- decode, batch 1, {s['new_tokens']} tokens: full {s['full_tokens_per_s']:.1f} tok/s, "
                     f"speculative {s['speculative_tokens_per_s']:.1f} tok/s: {s['speedup']:.2f}x")
    return "\n".join(lines) + "\n"


def _parity_line(report: dict) -> str:
    parity = report["parity"]
    what = f"greedy tokens identical to the {report['verify']} depth's over {parity['steps']} steps on {parity['prompts']} prompts"
    if not parity["mismatches"]:
        return what
    parts = "; ".join(f"prompt {m['prompt']} at step {m['step']}: {m['expected']} -> {m['got']}, the full depth's margin "
                      f"{m['reference_margin']:.1e} ({'a near tie' if m['near_tie'] else 'not a near tie'})"
                      for m in parity["mismatches"][:3])
    ties = sum(m["near_tie"] for m in parity["mismatches"])
    return (f"{what}, except {len(parity['mismatches'])} prompt(s) whose tokens part ({ties} at a near tie, within "
            f"{parity['tolerance']:g} of the largest logit, which parity allows): {parts}")

"""What a self-speculative round costs at batch 1 (issue 31's 7B-shaped estimate), measured on one device.

Over a multi-depth export (--export; or a random fp16 Llama of --shape/--layers, built and exported at
--speedups into --workdir first), in the captured loop (CUDA; on the CPU with the fixed-width step, to check
the script), interleaved rounds of:

- the full depth's plain greedy decode (queued captured steps): ms per token, t;
- for each draft depth and K (--ks): speculative_greedy over the same prompt: draft ms per draft pass times
  K (K draft passes, their queue and the wait for their ids; per pass because the last rounds draft fewer
  than K) and verify ms per round (the pass of K + 1 tokens, the accept test and the rollback). A round
  after one that kept every draft runs its two pending tokens in its first pass (runtime/speculative.py), so
  a round is K passes either way. A random model's draft is almost never accepted, so there every round pays
  the full price of a round and no pass has two tokens.

Each row also gives the acceptance on this prompt and the decode speedup measured there (plain greedy
seconds / speculative seconds after the first token, the same prompt, the same round). From these: c = draft
ms per drafted token / t (a draft step's cost, as a share of a full step), the verify
pass against a full step (v = verify ms / t, for K + 1 tokens), and for each acceptance rate given
(--acceptance LABEL:DEPTH=RATE, measured elsewhere on a trained model and named as such) the expected
speedup over plain greedy decoding, E[tokens per round] / (K c + v) with E = (1 - a^(K+1)) / (1 - a)
(each draft kept with chance a after the ones before it). The estimate prices a first pass of two tokens
(after a round that kept every draft: a^K of rounds) as a step; a trained model's rows measure it.

    python benchmarks/speculative_costs.py --shape 7b --layers 32 --workdir /root/sc --out RESULTS/speculative-costs-7b \\
        --acceptance "SmolLM2 healed alone:2x=0.772" --acceptance "kjv16 on the mixture:2x=0.740,3x=0.700"
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

from ulsexport.testing import add_shape_arguments, make_multi_depth_set, shape_from_args


def build(args) -> Path:
    shape = shape_from_args(args)   # a folder per shape, depth and speedups: a changed option builds anew
    work = Path(args.workdir) / f"{args.shape}-{shape['num_hidden_layers']}-{args.speedups.replace(',', '_')}"
    return make_multi_depth_set(work, shape, args.speedups.split(","), args.device)[0]


def parse_acceptance(items: list[str]) -> list[dict]:
    """'LABEL:DEPTH=RATE,DEPTH=RATE' -> [{label, rates: {depth: rate}}]."""
    out = []
    for item in items:
        label, _, rates = item.rpartition(":")
        out.append({"label": label, "rates": {d: float(r) for d, r in (p.split("=") for p in rates.split(","))}})
    return out


def main():
    from ulsexport.runtime.ort import MultiDepthDecoder
    from ulsexport.runtime.speculative import multi_token_capture_off, speculative_greedy

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(ap, "7b")
    ap.add_argument("--export", type=Path, help="a multi-depth export [default: build one of --shape]")
    ap.add_argument("--speedups", default="1,2,3")
    ap.add_argument("--workdir", default="/root/speculative-costs")
    ap.add_argument("--device", default="cuda", help="cuda; cpu only to check the script")
    ap.add_argument("--ks", default="1,2,3,4,5,6")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--acceptance", action="append", default=[], help="LABEL:DEPTH=RATE[,DEPTH=RATE] (repeat)")
    ap.add_argument("--build-only", action="store_true", help="build and export, measure nothing")
    ap.add_argument("--out", type=Path, help="NAME: writes NAME.json and NAME.md")
    ap.add_argument("--estimate-only", action="store_true",
                    help="measure nothing: NAME.json's costs with these --acceptance rates, NAME.md rewritten")
    args = ap.parse_args()
    if args.estimate_only and not args.out:
        ap.error("--estimate-only needs --out NAME (the NAME.json of an earlier run)")
    if args.estimate_only:
        report = json.loads(args.out.with_suffix(".json").read_text())
        report["estimates"] = estimate(report["rows"], report["full_step_ms"], args.acceptance)
        return save(report, args.out)
    export = args.export or build(args)
    if args.build_only:
        return
    options = {} if args.device == "cuda" else {"fixed_width": True}   # the captured loop's code, uncaptured
    runtime = MultiDepthDecoder(export, args.device, **options)
    full = runtime.default
    drafts = [d for d in runtime.depths if d != full]
    ks = [int(k) for k in args.ks.split(",")]
    vocab = runtime.onnx["io_shapes"]["logits"][-1]
    ids = np.random.default_rng(0).integers(3, vocab, (1, args.prompt_len), dtype=np.int64)
    mask = np.ones_like(ids)
    new = args.new_tokens
    step_ms: list[float] = []
    per_round: dict[str, dict[str, list[float]]] = {}
    loops = set()
    identical = True
    for round_ in range(args.rounds + 1):   # the first round warms up (captures), untimed
        run = runtime.greedy(ids, mask, new, depth=full)
        if round_:
            step_ms.append(1000 * run.decode_seconds / (new - 1))
        for draft in drafts:
            for k in ks:
                spec = speculative_greedy(runtime, ids, mask, new, draft, k)
                loops.add("captured" if spec.captured else "plain")
                identical &= spec.tokens[0] == [int(x) for x in run.tokens[0]]
                if round_:
                    cell = per_round.setdefault(f"{draft}|{k}", {"draft_ms": [], "verify_ms": [], "acceptance": [],
                                                                 "speedup": [], "drafted_per_round": []})
                    cell["speedup"].append(run.decode_seconds / spec.decode_seconds)   # both: the tokens after the first
                    # per draft pass, times K: the last rounds draft fewer than K (the tokens left)
                    cell["draft_ms"].append(1000 * spec.draft_seconds / spec.draft_passes * k)
                    cell["drafted_per_round"].append(spec.drafted / spec.rounds)
                    cell["verify_ms"].append(1000 * spec.verify_seconds / spec.rounds)
                    cell["acceptance"].append(spec.acceptance_rate)
        print(f"round {round_} done", flush=True)
    t = statistics.median(step_ms)
    rows = []
    for key, cell in per_round.items():
        draft, k = key.split("|")
        k = int(k)
        d, v = statistics.median(cell["draft_ms"]), statistics.median(cell["verify_ms"])
        rows.append({"draft": draft, "k": k, "draft_ms_per_round": d, "verify_ms_per_round": v,
                     "c": d / k / t, "verify_over_step": v / t, "acceptance_measured": statistics.mean(cell["acceptance"]),
                     "speedup_measured": statistics.median(cell["speedup"])})
    device = "CPU (a check of the script)"
    if args.device == "cuda":
        import torch

        device = torch.cuda.get_device_name()
    manifest = json.loads((Path(export) / "ulsexport.json").read_text())
    capture_off = next((why for d in drafts if (why := multi_token_capture_off(runtime, d, full))), None)
    report = {"device": device, "export": str(export), "verify_capture_off": capture_off, "kept_layers": {g["tag"]: len(g["kept"]) for g in manifest["graphs"]},
              "settings": vars(args) | {"export": str(export), "out": str(args.out)}, "loops": sorted(loops),
              "tokens_identical": identical, "full_step_ms": t, "full_step_ms_rounds": step_ms, "rows": rows,
              "per_round": per_round, "estimates": estimate(rows, t, args.acceptance)}
    save(report, args.out)
    if not identical:
        raise SystemExit("speculative tokens differed from the full depth's greedy tokens (see the table)")


def estimate(rows: list[dict], t: float, acceptance: list[str]) -> list[dict]:
    """For each given rate: the K with the highest expected speedup E[tokens per round] * t / round ms."""
    estimates = []
    for given in parse_acceptance(acceptance):
        for draft, a in given["rates"].items():
            best = None
            for row in (r for r in rows if r["draft"] == draft):
                k = row["k"]
                kept = k + 1 if a >= 1 else (1 - a ** (k + 1)) / (1 - a)
                speedup = kept * t / (row["draft_ms_per_round"] + row["verify_ms_per_round"])
                if best is None or speedup > best["speedup"]:
                    best = {"label": given["label"], "draft": draft, "acceptance": a, "k": k,
                            "tokens_per_round": kept, "speedup": speedup}
            if best:
                estimates.append(best)
    return estimates


def save(report: dict, out: Path | None) -> None:
    s = report["settings"]
    lines = [f"# Self-speculative round costs at batch 1 ({report['device']})", "",
             f"- export: `{report['export']}`, kept layers {report['kept_layers']}; prompt {s['prompt_len']} random "
             f"tokens, {s['new_tokens']} new tokens, medians of {s['rounds']} interleaved rounds; loop: "
             f"{', '.join(report['loops'])}; speculative tokens identical to the full depth's: "
             f"{'yes' if report['tokens_identical'] else 'NO'}"
             + (f"; verify passes ran uncaptured: {report['verify_capture_off']}" if report.get("verify_capture_off") else ""),
             f"- full depth, plain greedy (queued captured steps on CUDA): **{report['full_step_ms']:.3f} ms per token**",
             "", "| draft | K | draft ms / round (K passes) | c (draft pass / full step) | verify ms / round (K + 1 tokens) | "
             "verify / full step | acceptance here | speedup here (decode) |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(report["rows"], key=lambda r: (r["draft"], r["k"])):
        lines.append(f"| {r['draft']} | {r['k']} | {r['draft_ms_per_round']:.3f} | {r['c']:.3f} | "
                     f"{r['verify_ms_per_round']:.3f} | {r['verify_over_step']:.2f} | {r['acceptance_measured']:.3f} | "
                     f"{r['speedup_measured']:.2f}x |")
    if report["estimates"]:
        lines += ["", "Expected speedup over plain greedy decoding with acceptance rates measured elsewhere "
                  "(E[tokens per round] / (K c + v), the best K):", "",
                  "| acceptance from | draft | a | best K | tokens / round | expected speedup |", "|---|---|---|---|---|---|"]
        for e in report["estimates"]:
            lines.append(f"| {e['label']} | {e['draft']} | {e['acceptance']:.3f} | {e['k']} | "
                         f"{e['tokens_per_round']:.2f} | {e['speedup']:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
        out.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()

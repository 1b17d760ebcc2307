"""Self-speculative greedy decoding of a multi-depth export (issue 31's acceptance table), batch 1.

For each pruned depth of the export as the draft and each K (--ks), over --prompts prompts (windows of
--prompt-tokens tokens of held-out text: evenly spaced over --text, or over its last --tail share of
paragraphs; or the package's chat prompts with `--text chat`):

- speculative_greedy(runtime, prompt, new_tokens, draft, K): acceptance rate and tokens per verify pass,
  summed over the prompts;
- the full depth's plain greedy decode of the same prompt, timed beside it (each prompt: plain, then
  speculative, one after the other; a warm-up pair first, untimed): speedup = sum of plain seconds /
  sum of speculative seconds, end to end (both prefills included), and over the decode alone;
- the speculative tokens must equal the plain full-depth tokens (no early stop at EOS on either side):
  every row says whether they did; the script exits non-zero after writing its results if any did not.

Results go to --out NAME: NAME.json holds one section per --label (a later run with another label adds its
section, the same label replaces it), NAME.md is rendered from all the sections, with each section's
command line and machine. --summary FILE puts that file's text under the title (--render-only: just
re-render NAME.md from NAME.json).

    python benchmarks/speculative.py --export /tmp/sb/kjv16-multi --text ../shared/data/kjv-valid.txt \\
        --prompts 16 --new-tokens 64 --out benchmarks/results/speculative-cpu --label "kjv16, unhealed drafts"
"""
from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from ulsexport.testing import add_section_arguments, cpu_machine, save_sections, section_header


def text_prompts(path: str, tokenizer, count: int, length: int, tail: float) -> tuple[list[list[int]], str]:
    """`count` windows of `length` tokens, evenly spaced over the text (its last `tail` share of paragraphs)."""
    if path == "chat":
        from ulsexport.quality import CHAT_PROMPTS

        texts = [t for t in CHAT_PROMPTS.read_text().splitlines() if t.strip()]
        if count > len(texts):
            raise SystemExit(f"--prompts {count}: the chat prompts file has {len(texts)}")
        return [list(tokenizer(t)["input_ids"]) for t in texts[:count]], f"the first {count} of {CHAT_PROMPTS.name}"
    paragraphs = [p for p in Path(path).read_text().split("\n\n") if p.strip()]
    first = int(len(paragraphs) * (1 - tail)) if tail < 1 else 0
    held = paragraphs[first:]
    ids: list[int] = []
    for p in held:
        ids.extend(tokenizer(p.strip() + "\n\n", add_special_tokens=False)["input_ids"])
    if len(ids) < count * length:
        raise SystemExit(f"{path}: {len(ids)} tokens in the chosen paragraphs, fewer than {count} x {length}")
    starts = np.linspace(0, len(ids) - length, count).astype(int)
    where = f"paragraphs {first + 1}..{len(paragraphs)} of {len(paragraphs)}" if first else "the whole file"
    return ([ids[s:s + length] for s in starts],
            f"{count} windows of {length} tokens evenly spaced over {Path(path).name} ({where}, {len(ids)} tokens)")


def run_section(args) -> dict:
    from ulsexport.runtime.ort import MultiDepthDecoder
    from ulsexport.runtime.speculative import speculative_greedy
    from ulsexport.tokenizer import load_tokenizer

    load_before = os.getloadavg()[0]
    runtime = MultiDepthDecoder(args.export, "cpu", cuda_graph=False)
    verify = runtime.default
    drafts = args.drafts.split(",") if args.drafts else [d for d in runtime.depths if d != verify]
    ks = [int(k) for k in args.ks.split(",")]
    prompts, source = text_prompts(args.text, load_tokenizer(args.export), args.prompts, args.prompt_tokens, args.tail)
    new = args.new_tokens
    arrays = [np.array([p], np.int64) for p in prompts]

    def plain(ids):
        start = time.perf_counter()
        out = runtime.greedy(ids, np.ones_like(ids), new, depth=verify)
        return time.perf_counter() - start, out

    def spec(ids, draft, k):
        start = time.perf_counter()
        out = speculative_greedy(runtime, ids, np.ones_like(ids), new, draft, k, verify=verify)
        return time.perf_counter() - start, out

    # warm-up: every session once, untimed
    plain(arrays[0])
    for draft in drafts:
        spec(arrays[0], draft, ks[0])
    reference = [[int(t) for t in plain(ids)[1].tokens[0]] for ids in arrays]
    rows = []
    started = time.perf_counter()
    for draft in drafts:
        for k in ks:
            totals = dict(rounds=0, drafted=0, accepted=0, prefill=0.0, draft=0.0, verify=0.0)
            plain_s, spec_s, plain_decode, ratios, mismatches = [], [], [], [], []
            for i, ids in enumerate(arrays):
                p_seconds, p_run = plain(ids)
                s_seconds, s_run = spec(ids, draft, k)
                got, want = s_run.tokens[0], [int(t) for t in p_run.tokens[0]]
                if got != want or want != reference[i]:
                    step = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
                    mismatches.append({"prompt": i, "step": step})
                plain_s.append(p_seconds)
                spec_s.append(s_seconds)
                plain_decode.append(p_run.decode_seconds)
                ratios.append(p_seconds / s_seconds)
                for name in ("rounds", "drafted", "accepted"):
                    totals[name] += getattr(s_run, name)
                totals["prefill"] += s_run.prefill_seconds
                totals["draft"] += s_run.draft_seconds
                totals["verify"] += s_run.verify_seconds
            spec_decode = totals["draft"] + totals["verify"]
            row = {"draft": draft, "verify": verify, "k": k, "prompts": len(arrays),
                   "rounds": totals["rounds"], "drafted": totals["drafted"], "accepted": totals["accepted"],
                   "acceptance_rate": totals["accepted"] / totals["drafted"],
                   "tokens_per_verify": (totals["accepted"] + totals["rounds"]) / totals["rounds"],
                   "plain_seconds": sum(plain_s), "speculative_seconds": sum(spec_s),
                   "speedup": sum(plain_s) / sum(spec_s), "median_prompt_speedup": statistics.median(ratios),
                   "plain_decode_seconds": sum(plain_decode), "speculative_decode_seconds": spec_decode,
                   "decode_speedup": sum(plain_decode) / spec_decode,
                   "speculative_prefill_seconds": totals["prefill"],
                   "draft_seconds": totals["draft"], "verify_seconds": totals["verify"],
                   # per pass: one plain full-depth decode step, one verify pass (K + 1 tokens), one draft step
                   "full_step_ms": 1000 * sum(plain_decode) / (len(arrays) * (new - 1)),
                   "verify_pass_ms": 1000 * totals["verify"] / totals["rounds"],
                   "draft_step_ms": 1000 * totals["draft"] / totals["drafted"],
                   "identical": not mismatches, "mismatches": mismatches}
            rows.append(row)
            print(f"{draft} K={k}: acceptance {row['acceptance_rate']:.3f}, {row['tokens_per_verify']:.2f} tok/verify, "
                  f"plain {row['plain_seconds']:.2f} s, speculative {row['speculative_seconds']:.2f} s, "
                  f"speedup {row['speedup']:.2f}x, identical {'yes' if row['identical'] else 'NO'}", flush=True)
    return {"label": args.label, "export": str(args.export), "verify": verify, "depths": runtime.depths,
            "kept_layers": runtime.kept, "prompts": len(arrays), "prompt_source": source,
            "prompt_tokens": args.prompt_tokens, "new_tokens": new, "ks": ks, "drafts": drafts,
            "command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "machine": cpu_machine(),
            "note": args.note, "seconds": round(time.perf_counter() - started, 1),
            "load_average_1min": [load_before, os.getloadavg()[0]], "rows": rows}


def render(report: dict) -> str:
    lines = section_header(
        report, "Self-speculative decoding on the CPU: acceptance and speed (issue 31)",
        "Produced by `benchmarks/speculative.py`; every figure below comes from its JSON "
        "(`speculative-cpu.json` beside this file). Batch 1, greedy, no stop at EOS. Speedup = the full "
        "depth's plain greedy seconds / the speculative seconds, summed over the prompts (each prompt "
        "timed plain then speculative, one after the other), end to end with both prefills; decode speedup "
        "leaves the prefills out. \"identical\": the speculative tokens equal the full depth's plain greedy "
        "tokens for every prompt. Per-pass times: ms of one plain full-depth decode step, of one verify pass "
        "(K + 1 tokens through the full depth), of one draft step.")
    for section in report["sections"]:
        lines += [f"## {section['label']}", "",
                  f"- export: `{section['export']}` (depths {', '.join(section['depths'])}; verify: "
                  f"{section['verify']}; kept layers: " + "; ".join(f"{d}: {len(v)}" for d, v in section['kept_layers'].items())
                  + ")",
                  f"- prompts: {section['prompt_source']}; {section['new_tokens']} new tokens each",
                  f"- machine: this machine: {section['machine']}",
                  f"- command: `{section['command']}`",
                  f"- run time: {section['seconds']} s; 1-minute load average at its start and end: "
                  f"{section['load_average_1min'][0]:.2f}, {section['load_average_1min'][1]:.2f} (this process "
                  f"counts in it, on {os.cpu_count()} cores; other processes raise it)"]
        if section.get("note"):
            lines.append(f"- note: {section['note']}")
        lines += ["", "| draft | K | acceptance | tokens / verify | plain full s | speculative s | speedup | "
                      "decode speedup | full step ms | verify pass ms | draft step ms | identical |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in section["rows"]:
            lines.append(f"| {r['draft']} | {r['k']} | {r['acceptance_rate']:.3f} | {r['tokens_per_verify']:.2f} | "
                         f"{r['plain_seconds']:.2f} | {r['speculative_seconds']:.2f} | {r['speedup']:.2f}x | "
                         f"{r['decode_speedup']:.2f}x | {r['full_step_ms']:.2f} | {r['verify_pass_ms']:.2f} | "
                         f"{r['draft_step_ms']:.2f} | {'yes' if r['identical'] else 'NO'} |")
        lines.append("")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", type=Path, help="a multi-depth export (ulsexport onnx --speedups 1,2,3 ...)")
    ap.add_argument("--text", help="held-out text file (paragraphs split by blank lines), or 'chat'")
    ap.add_argument("--tail", type=float, default=1.0, help="share of the text's paragraphs, from its end, that "
                                                            "the windows come from [default: all]")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--ks", default="1,2,3,4,5,6", help="draft tokens per verify pass")
    ap.add_argument("--drafts", help="draft depths [default: every depth but the verifying one]")
    add_section_arguments(ap, "results")
    args = ap.parse_args()
    section = None
    if not args.render_only:
        if not (args.export and args.text):
            ap.error("--export and --text are needed (or --render-only)")
        section = run_section(args)
    save_sections(args, section, render)
    if section and not all(r["identical"] for r in section["rows"]):
        raise SystemExit("speculative tokens differ from the full depth's plain greedy tokens (see 'identical')")


if __name__ == "__main__":
    main()

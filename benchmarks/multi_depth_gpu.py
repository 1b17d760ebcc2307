"""Several depths over one copy of the weights on the GPU: device memory and decode speed.

A random fp16 Llama of the 7B width (hidden 4096, GQA 32/8, vocab 32000; --layers deep), exported once
at --speedups (`ulsexport onnx --speedups`). Then, on CUDA with our CUDA-graph decode:

- memory: the device memory that the MultiDepthDecoder (every depth, the weights given once to all its
  sessions) takes, against one full-depth session that loads its own weights (an ordinary single-depth
  artifact's runtime), each measured from torch.cuda.mem_get_info before and after, alone;
- speed: each depth's decode ms per step from the shared weights against the same graph in a session of
  its own (what a single-depth export of that depth runs), interleaved rounds, batch 1 and 8.

    python benchmarks/multi_depth_gpu.py --workdir /root/md --results $OUT/multi-depth --layers 16
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
from pathlib import Path

import numpy as np

from ulsexport.testing import add_shape_arguments, make_multi_depth_set, shape_from_args


def used_bytes(device: str) -> int:
    """Device memory in use (CUDA), or this process's resident memory (CPU, for a check run)."""
    gc.collect()
    if device == "cpu":
        import psutil

        return psutil.Process().memory_info().rss
    import torch

    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # torch's cached blocks (the export's) would otherwise hide the weights' tensors
    free, total = torch.cuda.mem_get_info()
    return total - free


def main():
    from ulsexport.runtime.ort import MultiDepthDecoder, OnnxDecoder

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(ap, "7b")
    ap.add_argument("--speedups", default="1,2,3")
    ap.add_argument("--workdir", default="/root/multi-depth-work")
    ap.add_argument("--results", type=Path, required=True)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--device", default="cuda", help="cuda; cpu only to check the script")
    args = ap.parse_args()
    work, shape = Path(args.workdir), shape_from_args(args)
    args.results.mkdir(parents=True, exist_ok=True)
    report = {"settings": vars(args) | {"results": str(args.results)}, "shape": shape}
    multi, seconds = make_multi_depth_set(work, shape, args.speedups.split(","), args.device)
    if seconds is not None:
        report["export_seconds"] = seconds
    manifest = json.loads((multi / "ulsexport.json").read_text())
    report["weights"] = manifest["weights"]
    report["graphs"] = [{k: g[k] for k in ("tag", "file", "kept")} for g in manifest["graphs"]]
    print("exported", report["weights"], flush=True)

    base = used_bytes(args.device)
    shared = MultiDepthDecoder(multi, args.device)
    report["memory"] = {"multi_depth_all_depths": used_bytes(args.device) - base,
                        "shared_weights_tensors": shared.weights.nbytes}
    del shared
    gc.collect()
    base = used_bytes(args.device)
    full_alone = OnnxDecoder(multi, args.device, graph="full")
    report["memory"]["one_full_depth_session"] = used_bytes(args.device) - base
    del full_alone
    gc.collect()
    print("memory", report["memory"], flush=True)

    shared = MultiDepthDecoder(multi, args.device)
    alone = {tag: OnnxDecoder(multi, args.device, graph=tag) for tag in shared.depths}
    report["cuda_graph_off"] = {tag: d.cuda_graph_off for tag, d in shared.decoders.items()}
    vocab = shape["vocab_size"]
    times: dict[str, list[float]] = {}
    tokens_equal = {}
    for round_ in range(args.rounds + 1):
        for batch in (int(b) for b in args.batches.split(",")):
            ids = np.random.default_rng(batch).integers(3, vocab, (batch, args.prompt_len), dtype=np.int64)
            mask = np.ones_like(ids)
            for tag in shared.depths:
                a = shared.greedy(ids, mask, args.new_tokens, depth=tag)
                b = alone[tag].greedy(ids, mask, args.new_tokens)
                tokens_equal[f"{tag}|{batch}"] = bool(np.array_equal(a.tokens, b.tokens))
                if round_:
                    for name, run in (("shared", a), ("alone", b)):
                        times.setdefault(f"{tag}|{batch}|{name}", []).append(
                            1000 * run.decode_seconds / (args.new_tokens - 1))
        print(f"round {round_} done", flush=True)
    report["decode_ms_per_step"] = times
    report["tokens_equal_shared_vs_alone"] = tokens_equal
    ratios = {}
    for key in {k.rsplit("|", 1)[0] for k in times}:
        per_round = [a / s for s, a in zip(times[f"{key}|shared"], times[f"{key}|alone"])]
        ratios[key] = {"median_alone_over_shared": statistics.median(per_round), "min": min(per_round),
                       "max": max(per_round), "shared_ms": statistics.median(times[f"{key}|shared"]),
                       "alone_ms": statistics.median(times[f"{key}|alone"])}
    report["speed"] = ratios
    import torch

    report["device"] = (f"{torch.cuda.get_device_name()}, torch {torch.__version__}" if args.device == "cuda"
                        else "CPU (a check run)")
    (args.results / "multi-depth-gpu.json").write_text(json.dumps(report, indent=2) + "\n")
    gib = 2**30
    lines = [f"# Several depths over one copy of the weights ({report['device']})", "",
             f"7B-wide random fp16 Llama, {shape['num_hidden_layers']} layers, speedups {args.speedups}; "
             f"weights file {report['weights']['bytes'] / gib:.2f} GiB (the depths would take "
             f"{report['weights']['bytes_if_each_depth_held_its_own'] / gib:.2f} GiB each on its own).", "",
             f"Device memory: every depth from the shared weights {report['memory']['multi_depth_all_depths'] / gib:.2f} GiB; "
             f"one full-depth session loading its own {report['memory']['one_full_depth_session'] / gib:.2f} GiB.", "",
             "| depth | batch | shared weights ms/step | own weights ms/step | own / shared (median per round) | tokens equal |",
             "|---|---|---|---|---|---|"]
    for key in sorted(ratios):
        r = ratios[key]
        tag, batch = key.split("|")
        lines.append(f"| {tag} | {batch} | {r['shared_ms']:.3f} | {r['alone_ms']:.3f} | "
                     f"{r['median_alone_over_shared']:.3f} ({r['min']:.3f}..{r['max']:.3f}) | {tokens_equal[key]} |")
    (args.results / "multi-depth-gpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Does an onnxruntime session option move our decode speed, and how much do repeated runs vary?

Times exports of `ulsexport onnx` (folders) in our onnxruntime loop with the session as OnnxDecoder
makes it, with one intra-op thread, and with intra-op spinning off; every configuration twice
(round 1, then round 2), so that run-to-run drift shows beside the options' effect.

    python benchmarks/experiments/session-options/ort_session_options_speed.py /root/fw/mha /root/fw/gqa --json opts.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

OPTIONS = {"default": {}, "threads1": {"intra_op_num_threads": 1},
           "nospin": {"config": ("session.intra_op.allow_spinning", "0")}}


def open_with_options(folder: Path, options: dict, device: str):
    """Our onnxruntime runtime over `folder`, its session made with `options` (none: as OnnxDecoder makes it)."""
    import onnxruntime as ort

    from ulsexport.runtime import open_runtime
    from ulsexport.runtime.ort import PROVIDERS, OnnxDecoder

    if not options:
        return open_runtime(folder, "ort", "fp16", device)
    session_options = ort.SessionOptions()
    session_options.log_severity_level = 3
    if "intra_op_num_threads" in options:
        session_options.intra_op_num_threads = options["intra_op_num_threads"]
    if "config" in options:
        session_options.add_session_config_entry(*options["config"])
    session = ort.InferenceSession(str(folder / "model.onnx"), session_options, providers=PROVIDERS[device])
    return OnnxDecoder(folder, device, session=session)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()

    from ulsexport.validate import SpeedSettings, measure_speed

    settings = SpeedSettings((1, 8), 128, 128, args.runs, 1)
    results = {}
    for round_ in (1, 2):
        for folder in args.folders:
            for name, options in OPTIONS.items():
                runtime = open_with_options(folder, options, args.device)
                speed = measure_speed(runtime, settings, args.vocab)
                key = f"{round_}.{folder.name}.{name}"
                results[key] = {b: speed[b]["decode_tokens_per_s"] for b in ("1", "8")}
                print(key, {b: round(v["median"], 1) for b, v in results[key].items()}, flush=True)
                del runtime
    args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

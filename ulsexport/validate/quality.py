"""Quality: what pruning cost, as perplexity on held-out text and BLEU / ROUGE-L on prompted tasks."""
from __future__ import annotations

import statistics
from pathlib import Path

from ..errors import UserError


EVAL_TOKENS = 100_000      # of each held-out text
SAMPLED_WINDOWS = 32       # teacher-sampled windows for the top-1 agreement


def generality_report(reference_dir: Path, pruned_dir: Path, texts, device: str,
                      samples: int = SAMPLED_WINDOWS) -> dict:
    """The generality table of the full model and the pruned one: perplexity on each held-out text, top-1
    agreement with the full model on windows it samples (unconditional and chat), and the chat answers'
    agreement where there is a chat template (`samples` windows; 0: no agreement column). The first text's perplexities are kept as `perplexity`
    (full / pruned) too."""
    from ..heal.samples import SampleSettings, teacher_samples
    from ..models import load_causal_lm
    from ..quality import EVAL_SEED_OFFSET, EVAL_WINDOW, domain_windows, generality, prepare_generality
    from ..tokenizer import load_tokenizer

    texts = [texts] if isinstance(texts, (str, Path)) else list(texts)
    tokenizer = load_tokenizer(pruned_dir)
    domains = domain_windows(tokenizer, texts, EVAL_TOKENS)
    full = load_causal_lm(reference_dir, "fp32", device)
    sampled = []
    if samples:
        array, _ = teacher_samples(full, tokenizer, Path(reference_dir), None, None,
                                   SampleSettings(samples, EVAL_WINDOW, seed=EVAL_SEED_OFFSET), quiet=True)
        sampled = array.tolist()
    g = prepare_generality(full, tokenizer, domains, sampled)
    rows = {"full": generality(full, g)}
    del full
    rows["pruned"] = generality(load_causal_lm(pruned_dir, "fp32", device), g)
    first = next(iter(domains))
    return {"generality": {**g.describe(), "texts": [str(t) for t in texts], "rows": rows},
            "perplexity": {"text": str(texts[0]), "tokens": sum(len(w) for w in domains[first]),
                           "full": rows["full"]["perplexity"][first], "pruned": rows["pruned"]["perplexity"][first]}}


def require_task_metrics() -> None:
    """--tasks needs sacrebleu and rouge-score (the `tasks` extra): refused at once when missing."""
    import importlib.util

    missing = [name for name, module in (("sacrebleu", "sacrebleu"), ("rouge-score", "rouge_score"))
               if importlib.util.find_spec(module) is None]
    if missing:
        raise UserError(f"--tasks needs {' and '.join(missing)}: pip install 'ulsexport[tasks]'")


def score_tasks(reference_dir: Path, pruned_dir: Path, tasks, device: str, max_new_tokens: int = 64) -> dict:
    """BLEU (sacrebleu) and ROUGE-L (rouge-score) of greedy outputs for a JSONL of prompt/reference."""
    import json

    require_task_metrics()
    import sacrebleu
    import torch
    from rouge_score import rouge_scorer

    from ..models import load_causal_lm
    from ..tokenizer import load_tokenizer

    try:
        rows = [json.loads(line) for line in Path(tasks).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, ValueError):
        raise UserError(f"{tasks} must be readable UTF-8 JSONL with 'prompt' and 'reference' on every line") from None
    if not rows or not all(isinstance(r, dict) and {"prompt", "reference"} <= set(r) for r in rows):
        raise UserError(f"{tasks} must be JSONL with 'prompt' and 'reference' on every line")
    tokenizer = load_tokenizer(pruned_dir)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    out = {}
    for name, folder in (("full", reference_dir), ("pruned", pruned_dir)):
        model = load_causal_lm(folder, "fp32", device)
        outputs = []
        for row in rows:
            ids = tokenizer(row["prompt"], return_tensors="pt").input_ids.to(model.device)
            with torch.no_grad():
                new = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)[0, ids.shape[1]:]
            outputs.append(tokenizer.decode(new, skip_special_tokens=True).strip())
        refs = [r["reference"] for r in rows]
        out[name] = {"bleu": sacrebleu.corpus_bleu(outputs, [refs]).score,
                     "rougeL": 100 * statistics.mean(scorer.score(r, o)["rougeL"].fmeasure
                                                     for r, o in zip(refs, outputs))}
    out["examples"] = len(rows)
    return out

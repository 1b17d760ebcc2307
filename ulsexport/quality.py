"""Quality measures: perplexity of a causal LM over held-out text, and the generality table (perplexity on
several domains, top-1 agreement with the teacher on its own samples, chat answers' agreement)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError


def read_text(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"text file {path} does not exist")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise UserError(f"text file {path} is empty")
    return text


def token_windows(tokenizer, text: str, window: int, max_tokens: int | None = None) -> list[list[int]]:
    """The text's tokens, each paragraph encoded as BOS + text + EOS (where the tokenizer has them),
    cut into non-overlapping windows of `window` tokens."""
    ids: list[int] = []
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for paragraph in (p for p in text.split("\n") if p.strip()):
        ids.extend(bos + tokenizer(paragraph, add_special_tokens=False)["input_ids"] + eos)
        if max_tokens and len(ids) >= max_tokens:
            ids = ids[:max_tokens]
            break
    return [ids[i:i + window] for i in range(0, len(ids) - 1, window) if len(ids[i:i + window]) > 1]


def perplexity(model, windows: list[list[int]], batch_size: int = 8, progress=None) -> float:
    """exp(mean next-token negative log-likelihood) over every predicted token in `windows`."""
    import torch

    if not windows:
        raise UserError("no text to score: the text gave fewer than 2 tokens")
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(windows), batch_size):
            batch = windows[start:start + batch_size]
            width = max(len(w) for w in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for row, w in enumerate(batch):
                ids[row, :len(w)] = torch.tensor(w)
                mask[row, :len(w)] = 1
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
            valid = mask[:, 1:].reshape(-1).bool()
            total_nll += nll[valid].sum().item()
            total_tokens += int(valid.sum())
            if progress is not None:
                progress.update(len(batch))
    return math.exp(total_nll / total_tokens)


# --- generality: how much of the teacher's behaviour a pruned model keeps, as a small table ---

EVAL_SEED_OFFSET = 1_000_003   # held-out teacher samples: a seed training samples never use
CHAT_PROMPTS = Path(__file__).parent / "data" / "chat_prompts.txt"
CHAT_TOKENS = 32          # greedy answer tokens compared per chat prompt
GREEDY_PROMPTS = 16       # held-out windows per domain whose start the teacher continues greedily
GREEDY_PROMPT_TOKENS = 32
GREEDY_TOKENS = 64        # the teacher's greedy tokens after each, on which the model's top-1 is compared
EVAL_WINDOW = 256


@dataclass
class Generality:
    """What the generality table is measured on, prepared once with the teacher:
    held-out text per domain, windows the teacher sampled (with its own top-1 choices), the starts of
    held-out windows continued by the teacher greedily, and chat prompts (with the teacher's greedy
    answers) where the tokenizer has a chat template."""
    domains: dict[str, list[list[int]]]
    sampled: list[list[int]] = field(default_factory=list)
    teacher_top1: list = field(default_factory=list)
    greedy: list[list[int]] = field(default_factory=list)   # GREEDY_PROMPT_TOKENS of text + the teacher's tokens
    chat_prompts: list[list[int]] = field(default_factory=list)
    teacher_answers: list[list[int]] = field(default_factory=list)
    eos: int | None = None

    def describe(self) -> dict:
        return {"domains": {name: sum(len(w) for w in windows) for name, windows in self.domains.items()},
                "sampled_windows": len(self.sampled), "greedy_prompts": len(self.greedy),
                "greedy_tokens": GREEDY_TOKENS, "chat_prompts": len(self.chat_prompts), "chat_tokens": CHAT_TOKENS}


def domain_windows(tokenizer, texts, max_tokens: int, window: int = EVAL_WINDOW) -> dict[str, list[list[int]]]:
    """Held-out windows per text file, named by the file's stem (made unique)."""
    domains: dict[str, list[list[int]]] = {}
    for text in texts:
        name, n = Path(text).stem, 2
        while name in domains:
            name, n = f"{Path(text).stem}-{n}", n + 1
        domains[name] = token_windows(tokenizer, read_text(text), window, max_tokens)
        if not domains[name]:
            raise UserError(f"--eval-text {text} gives fewer than 2 tokens")
    return domains


def chat_prompts(tokenizer, path: Path = CHAT_PROMPTS) -> list[list[int]]:
    """The prompt set through the tokenizer's chat template (none without a template)."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    questions = [q.strip() for q in path.read_text(encoding="utf-8").splitlines() if q.strip()]
    return [tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                    add_generation_prompt=True),
                      add_special_tokens=False)["input_ids"] for q in questions]


def prepare_generality(teacher, tokenizer, domains: dict, sampled: list[list[int]], chat: bool = True) -> Generality:
    from .models import continue_prompts

    prompts = chat_prompts(tokenizer) if chat else []
    starts = greedy_prompts(domains)
    greedy = [p + c for p, c in zip(starts, _answers(teacher, starts, continue_prompts, GREEDY_TOKENS))]
    return Generality(domains=domains, sampled=sampled, teacher_top1=_top1(teacher, sampled), greedy=greedy,
                      chat_prompts=prompts,
                      teacher_answers=_answers(teacher, prompts, continue_prompts),
                      eos=tokenizer.eos_token_id)


def greedy_prompts(domains: dict[str, list[list[int]]]) -> list[list[int]]:
    """The first GREEDY_PROMPT_TOKENS of up to GREEDY_PROMPTS held-out windows per domain, evenly spaced."""
    prompts = []
    for windows in domains.values():
        usable = [w for w in windows if len(w) >= GREEDY_PROMPT_TOKENS]
        step = max(1, len(usable) // GREEDY_PROMPTS)
        prompts += [w[:GREEDY_PROMPT_TOKENS] for w in usable[::step][:GREEDY_PROMPTS]]
    return prompts


def generality(model, g: Generality, what: str | None = None) -> dict:
    """Perplexity per domain; top-1 agreement with the teacher on its own samples; greedy agreement: the
    share of the teacher's greedy continuations of held-out text where the model's top-1 is the teacher's
    next token (teacher forcing: the acceptance rate of self-speculative decoding with this model as the
    draft); and the greedy chat answers' token agreement with the teacher's (None where there is nothing
    to measure). With `what` (the model's name), a progress bar over the parts."""
    from .models import continue_prompts
    from .progress import progress_bar

    parts = len(g.domains) + bool(g.sampled) + bool(g.greedy) + bool(g.chat_prompts)
    with progress_bar(parts, f"evaluating {what}", unit="part", quiet=what is None) as bar:
        ppl = {}
        for name, windows in g.domains.items():
            ppl[name] = perplexity(model, windows)
            bar.update(1)
        top1 = None
        if g.sampled:
            matches = [(mine == theirs).sum().item() for mine, theirs in zip(_top1(model, g.sampled), g.teacher_top1)]
            top1 = sum(matches) / sum(t.numel() for t in g.teacher_top1)
            bar.update(1)
        greedy = None
        if g.greedy:
            import torch

            mine = torch.cat(_top1(model, g.greedy))[:, GREEDY_PROMPT_TOKENS - 1:-1]
            theirs = torch.tensor([row[GREEDY_PROMPT_TOKENS:] for row in g.greedy])
            greedy = (mine == theirs).float().mean().item()
            bar.update(1)
        chat = None
        if g.chat_prompts:
            compared = agreed = 0
            for mine, theirs in zip(_answers(model, g.chat_prompts, continue_prompts), g.teacher_answers):
                length = theirs.index(g.eos) + 1 if g.eos in theirs else len(theirs)
                compared += length
                agreed += sum(a == b for a, b in zip(mine[:length], theirs[:length]))
            chat = agreed / compared
            bar.update(1)
    return {"perplexity": ppl, "top1_agreement": top1, "greedy_agreement": greedy, "chat_agreement": chat}


def _top1(model, windows: list[list[int]], batch_size: int = 8) -> list:
    """The model's most likely next token at every position, one CPU tensor per batch of windows."""
    import torch

    if not windows:
        return []
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for start in range(0, len(windows), batch_size):
            ids = torch.tensor(windows[start:start + batch_size], device=device)
            out.append(model(input_ids=ids, use_cache=False).logits.argmax(-1).cpu())
    return out


def _answers(model, prompts: list[list[int]], continue_prompts, tokens: int = CHAT_TOKENS,
             batch_size: int = 16) -> list[list[int]]:
    answers: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        answers.extend(continue_prompts(model, prompts[start:start + batch_size], tokens))
    return answers


def generality_table(rows: dict[str, dict], reference: str = "teacher") -> str:
    """Markdown: a row per model (perplexity per domain, with its ratio to `reference`'s), top-1 and chat
    agreement."""
    first = next(iter(rows.values()))
    names = list(first["perplexity"])
    base = rows.get(reference)
    head = ["model", *[f"ppl {n}" for n in names], "top-1 agreement", "greedy agreement", "chat agreement"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, row in rows.items():
        cells = [label]
        for n in names:
            value = row["perplexity"].get(n)
            ratio = f" ({value / base['perplexity'][n]:.2f}x)" if base and row is not base and value else ""
            cells.append(_fmt(value) + ratio)
        cells += [_fmt(row.get(k), 3) for k in ("top1_agreement", "greedy_agreement", "chat_agreement")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) and math.isfinite(value) else str(value)

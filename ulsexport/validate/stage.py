"""The validate stage: its settings (`ValidateSettings`, declared once: the CLI's options and a recipe's
`validate:` section build it) and the one call that runs them (`ValidateSettings.run`)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .speed import SpeedSettings


@dataclass(frozen=True)
class ValidateSettings:
    runtime: str = "torch"
    device: str = "cpu"
    dtype: str | None = None                      # None: the artifact's own, else fp32
    batches: tuple[int, ...] = SpeedSettings.batches
    prompt_len: int = SpeedSettings.prompt_len
    new_tokens: int = SpeedSettings.new_tokens
    runs: int = SpeedSettings.runs
    warmup: int = SpeedSettings.warmup
    no_speed: bool = False                        # parity (and quality) only
    parity_steps: int = 32
    tolerance: float | None = None                # None: the dtype's (precision.py)
    text: tuple[Path, ...] | None = None          # held-out texts: the generality table
    eval_samples: int = 32
    tasks: Path | None = None
    depth: str | None = None                      # a multi-depth export: this depth only
    no_cuda_graph: bool = False
    decode_kernels: bool = False
    speculative: str | None = None                # a multi-depth export: this depth drafts, the full one verifies
    draft_tokens: int = 4
    adaptive: bool = False

    @property
    def speed(self) -> SpeedSettings | None:
        if self.no_speed:
            return None
        return SpeedSettings(tuple(self.batches), self.prompt_len, self.new_tokens, self.runs, self.warmup)

    def check(self) -> None:
        """Refuse settings that cannot give a measurement, before any model is loaded."""
        from . import check_device, check_settings

        check_settings(self.speed, self.parity_steps, self.tolerance)
        check_device(self.device)
        if not 0 <= self.eval_samples <= 100_000:
            raise UserError(f"--eval-samples {self.eval_samples} must be between 0 and 100000")

    def run(self, reference, candidate, reference_artifact=None, quiet: bool = False,
            depth_references: dict | None = None) -> dict:
        """The report: `candidate` against `reference` (parity, speed, quality), or self-speculative decoding
        of a multi-depth `candidate` against its own full depth (`speculative`; no reference needed)."""
        self.check()
        if self.speculative:
            from .speculative import validate_speculative

            return validate_speculative(Path(candidate), self.speculative, self.draft_tokens, self.device,
                                        self.parity_steps, self.speed, quiet=quiet, adaptive=self.adaptive)
        if not reference:
            raise UserError("--reference is required: the original checkpoint the candidate came from")
        from . import validate

        return validate(reference, candidate, self.runtime, self.device, self.dtype, self.speed, self.parity_steps,
                        self.tolerance, list(self.text) if self.text else None, self.tasks, reference_artifact,
                        quiet=quiet, cuda_graph=False if self.no_cuda_graph else None,
                        decode_kernels=self.decode_kernels, depth=self.depth, eval_samples=self.eval_samples,
                        depth_references=depth_references)

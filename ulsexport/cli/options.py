"""Options and helpers that several commands share."""
from __future__ import annotations

from pathlib import Path

import click

from ..errors import UserError
from ..plan import parse_index_list
from ..plan.scoring import PlanSettings

ARTIFACTS = Path("artifacts")


class Terminated(KeyboardInterrupt):
    """SIGTERM (plain `kill`, `timeout`), raised like Ctrl-C so that every output is cleaned up."""


def _set_quiet(ctx, param, value):
    quiet = ctx.ensure_object(dict)
    if value:
        quiet["quiet"] = True
    else:
        quiet.setdefault("quiet", False)
    return value


def quiet_option(f):
    """-q/--quiet, accepted before the subcommand and after it alike: sets ctx.obj["quiet"]."""
    return click.option("--quiet", "-q", is_flag=True, expose_value=False, callback=_set_quiet,
                        help="No progress bars.")(f)


def plan_options(f):
    f = click.option("--skip", help="Explicit layers to remove, e.g. 1,3,10-12 (instead of a strategy).")(f)
    f = click.option("--keep", help="Explicit layers to keep, e.g. 0,2,5,7 (instead of a strategy).")(f)
    f = click.option("--strategy", default=PlanSettings.strategy, show_default=True,
                     help="uls: the ULS authors' rule; even: K layers spread evenly; "
                          "top: drop the layers just below the last; first: keep the first K; "
                          "bi, angular, greedy-ppl: chosen from --calib text (see compare-plans).")(f)
    f = click.option("--speedup", "-s", type=float,
                     help="Target speedup s; the plan keeps K = int(L / s) layers.")(f)
    return f


def calib_options(f):
    f = click.option("--device", default=PlanSettings.device, show_default=True,
                     help="Where calibration scoring runs: cpu or cuda.")(f)
    f = click.option("--calib-tokens", type=int, default=PlanSettings.calib_tokens, show_default=True,
                     help="Calibration tokens used (from the start of --calib).")(f)
    f = click.option("--calib", type=click.Path(path_type=Path),
                     help="Calibration text (one paragraph a line) for --strategy bi|angular|greedy-ppl.")(f)
    return f


def check_plan_conflicts(speedup, keep, skip) -> None:
    """An explicit --keep/--skip list is the whole plan: refuse --speedup or an explicitly given
    --strategy beside it rather than silently ignoring one of them."""
    if keep is None and skip is None:
        return
    option = "--keep" if keep is not None else "--skip"
    if speedup is not None:
        raise UserError(f"{option} gives the layers explicitly; drop --speedup (or drop {option})")
    ctx = click.get_current_context(silent=True)
    if ctx is not None and "strategy" in ctx.params:
        from click.core import ParameterSource

        if ctx.get_parameter_source("strategy") not in (ParameterSource.DEFAULT, None):
            raise UserError(f"{option} gives the layers explicitly; drop --strategy (or drop {option})")


def layer_plan_option(model, speedup, strategy, keep, skip, calib, calib_tokens, device):
    check_plan_conflicts(speedup, keep, skip)
    keep_list, skip_list = index_lists(keep, skip)
    settings = PlanSettings(strategy, speedup, keep_list, skip_list, calib, calib_tokens, device)
    return settings.plan(model, quiet=click.get_current_context().obj["quiet"])


def index_lists(keep, skip):
    return (parse_index_list(keep, "--keep") if keep else None,
            parse_index_list(skip, "--skip") if skip else None)


def parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    upper = text.strip().upper()
    for unit, factor in units.items():
        if upper.endswith(unit):
            try:
                return int(float(upper[: -len(unit)]) * factor)
            except ValueError:
                break
    raise UserError(f"--max-shard-size: '{text}' is not a size like 5GB or 500MB")

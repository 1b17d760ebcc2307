"""The command-line reference, docs/cli.md, rendered from the click commands themselves.

    python -m ulsexport.cli.reference > docs/cli.md

`render()` walks the `ulsexport` group in its registration order and writes, per command, its usage, its
help text and a table of its arguments and options (click's own attributes: opts, type, default where
shown, help). The output depends only on the code (no addresses, no machine paths), so a test can compare
docs/cli.md with it.
"""
from __future__ import annotations

import enum
import inspect
import re
import textwrap

import click

REGENERATE = "python -m ulsexport.cli.reference > docs/cli.md"

_CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)


def render() -> str:
    """docs/cli.md: every `ulsexport` command and option, as Markdown."""
    from . import main

    root = click.Context(main, info_name="ulsexport")
    lines = [
        "# Command-line reference",
        "",
        "Every `ulsexport` command with its options, as `ulsexport COMMAND --help` gives them; come here for",
        "a flag's exact name, type and default. The pipeline end to end is in [pipeline.md](pipeline.md).",
        "",
        "Generated from the code by `ulsexport/cli/reference.py`, do not edit by hand; regenerate with",
        f"`{REGENERATE}`.",
        "",
        "Every command also takes `-h`/`--help`. Exit codes: 0 done, 1 `validate` parity failed, 2 bad input,",
        "130 Ctrl-C, 143 SIGTERM ([guarantees.md](guarantees.md)).",
        "",
        "Commands: " + ", ".join(f"[{name}](#ulsexport-{_anchor(name)})" for name in main.commands) + ".",
        "",
    ]
    lines += _section("ulsexport", main, root, heading="## ulsexport (the group)")
    for name, command in main.commands.items():
        ctx = click.Context(command, info_name=name, parent=root)
        lines += _section(f"ulsexport {name}", command, ctx)
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines) + "\n"


def _anchor(name: str) -> str:
    return re.sub(r"[^a-z0-9 -]", "", name.lower()).replace(" ", "-")


def _section(title: str, command: click.Command, ctx: click.Context, heading: str | None = None) -> list[str]:
    usage = " ".join([ctx.command_path, *command.collect_usage_pieces(ctx)])
    lines = [heading or f"## {title}", "", f"Usage: `{usage}`", ""]
    if getattr(command, "deprecated", False):
        lines += ["*Deprecated.*", ""]
    lines += _help_blocks(command.help or command.short_help or "")
    rows = [_row(param, ctx) for param in command.params if not getattr(param, "hidden", False)]
    if rows:
        lines += ["| argument or option | type | default | description |", "|---|---|---|---|"]
        lines += [f"| {' | '.join(row)} |" for row in rows]
        lines.append("")
    if command.epilog:
        lines += _help_blocks(command.epilog)
    if isinstance(command, click.Group) and command.commands:
        lines += ["Commands: " + ", ".join(f"`{name}`" for name in command.commands) + ".", ""]
    return lines


def _help_blocks(text: str) -> list[str]:
    """click's help text as Markdown: paragraphs as they are, a paragraph marked with click's \\b (keep
    as written) as a code block; anything after \\f (click's cut mark) is left out."""
    text = inspect.cleandoc(text.split("\f", 1)[0])
    lines: list[str] = []
    for paragraph in re.split(r"\n\s*\n", text):
        if not paragraph.strip():
            continue
        if paragraph.lstrip(" ").startswith("\b"):
            body = paragraph.lstrip(" ")[1:].lstrip("\n")
            lines += ["```text", *textwrap.dedent(body).rstrip().splitlines(), "```", ""]
        else:
            lines += [_escape(line.strip()) for line in paragraph.splitlines()] + [""]
    return lines


def _row(param: click.Parameter, ctx: click.Context) -> list[str]:
    if isinstance(param, click.Argument):
        names = f"`{param.make_metavar(ctx) if _takes_ctx(param) else param.human_readable_name}`"
    else:
        names = ", ".join(f"`{opt}`" for opt in param.opts)
        if param.secondary_opts:
            names += " / " + ", ".join(f"`{opt}`" for opt in param.secondary_opts)
    return [names, _cell(_type(param)), _cell(_default(param)), _cell(_escape(_help(param)))]


def _takes_ctx(param: click.Parameter) -> bool:
    try:
        return "ctx" in inspect.signature(param.make_metavar).parameters
    except (TypeError, ValueError):
        return False


def _type(param: click.Parameter) -> str:
    kind = param.type
    if isinstance(param, click.Option) and param.is_flag and not param.secondary_opts and \
            isinstance(kind, click.types.BoolParamType):
        text = "flag"
    elif isinstance(kind, click.Choice):
        text = " \\| ".join(f"`{_plain(choice)}`" for choice in kind.choices)
    elif getattr(param, "metavar", None):
        text = f"`{param.metavar}`"
    else:
        text = kind.name
        low, high = getattr(kind, "min", None), getattr(kind, "max", None)
        if low is not None or high is not None:
            text += f" ({'' if low is None else low}..{'' if high is None else high})"
    if param.nargs not in (1, -1) and param.nargs is not None:
        text += f", {param.nargs} values"
    if param.nargs == -1:
        text += ", any number"
    if param.multiple:
        text += ", repeatable"
    return text


def _default(param: click.Parameter) -> str:
    if param.required:
        return "required"
    if not isinstance(param, click.Option):
        return ""
    shown = param.show_default
    if isinstance(shown, str):
        return _escape(shown)
    if not shown:
        return ""
    value = param.default
    if value is None or value is getattr(click.core, "UNSET", None) or type(value).__name__ == "Sentinel":
        return ""
    if callable(value):
        return "(computed when run)"
    if param.is_flag and isinstance(value, bool) and not param.secondary_opts:
        return "on" if value else ""
    if isinstance(value, (list, tuple)):
        if not value:
            return ""
        return ", ".join(f"`{_plain(v)}`" for v in value)
    return f"`{_plain(value)}`"


def _plain(value) -> str:
    if isinstance(value, enum.Enum):
        value = value.value if isinstance(value.value, (str, int, float)) else value.name
    return str(value).replace("`", "'")


def _help(param: click.Parameter) -> str:
    text = getattr(param, "help", None) or ""
    text = inspect.cleandoc(text.split("\f", 1)[0]) if text else ""
    return " ".join(line.strip() for line in text.replace("\b", "").splitlines() if line.strip())


def _escape(text: str) -> str:
    """Markdown's special characters outside code spans: < (HTML), * (emphasis)."""
    out, last = [], 0
    for match in _CODE_SPAN.finditer(text):
        out.append(_escape_plain(text[last:match.start()]))
        out.append(match.group(0))
        last = match.end()
    out.append(_escape_plain(text[last:]))
    return "".join(out)


def _escape_plain(text: str) -> str:
    return text.replace("\\", "\\\\").replace("<", "\\<").replace("*", "\\*")


def _cell(text: str) -> str:
    """A table cell: no line breaks, | escaped (GitHub reads \\| inside code spans in tables too)."""
    return re.sub(r"(?<!\\)\|", r"\\|", text.replace("\n", " "))


if __name__ == "__main__":
    print(render(), end="")

"""The one exception type that the command line turns into a one-line message and exit code 2."""


class UserError(Exception):
    """Bad input from the user: a wrong path, an impossible plan, an unsupported model.

    The CLI prints ``error: <message>`` on one line and exits with status 2.
    """


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (libraries' own errors are often pages long)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

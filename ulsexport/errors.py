"""The one exception type that the command line turns into a one-line message and exit code 2."""


class UserError(Exception):
    """Bad input from the user: a wrong path, an impossible plan, an unsupported model.

    The CLI prints ``error: <message>`` on one line and exits with status 2.
    """

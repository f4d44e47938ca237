"""The package's one error type: low-level failures are wrapped in it with a reason a person can act on."""


class OmniVisionError(Exception):
    """A failure with a message meant for the user (bad input, missing or mismatched files)."""


def check_name(what: str, name: str) -> str:
    """`name` when it can stand inside a ROS parameter name (`cameras.<name>.topic`,
    `watches.<name>.question`): ASCII letters, digits and underscores; else an OmniVisionError."""
    if not name or not name.isascii() or not name.replace("_", "").isalnum():
        raise OmniVisionError(f"{what} '{name}' must be letters, digits and underscores")
    return name


def run_command(prog: str, body, also: tuple[type[BaseException], ...] = (), code: int = 2) -> int:
    """Run a command-line tool's body: an OmniVisionError (or one of `also`) becomes one line on
    stderr and exit status `code`, never a traceback; Ctrl-C exits with 130."""
    import sys

    try:
        return body()
    except (OmniVisionError, *also) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        return 130

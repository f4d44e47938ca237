"""The package's one error type: low-level failures are wrapped in it with a reason a person can act on."""


class OmniVisionError(Exception):
    """A failure with a message meant for the user (bad input, missing or mismatched files)."""


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

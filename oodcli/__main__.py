"""``python -m oodcli`` and the ``oodcli`` console script. The command line is imported inside
``run`` so that Ctrl-C while it loads (the first fraction of a second) ends as an interrupt
always does, one line and exit 130, not a traceback."""

import sys


def run() -> None:
    try:
        from oodcli.cli import main
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    sys.exit(main())


if __name__ == "__main__":
    run()

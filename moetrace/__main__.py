"""``python -m moetrace``: the command line without an installed entry point."""

from moetrace.cli import main

if __name__ == "__main__":
    main()

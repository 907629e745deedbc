"""``python -m coordinator``: the same entry point as the ``coordinator`` console script."""

from coordinator.cli import main

if __name__ == "__main__":
    main()

"""`python -m bertforge ...` is the same as the `bertforge` console script (torchrun uses it)."""

from bertforge.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

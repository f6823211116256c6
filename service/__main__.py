"""``python -m embedserve.service`` is the ``embedserve`` command."""

from embedserve.service.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

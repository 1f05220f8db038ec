"""The ``dp-microclip`` command: ``epsilon``, ``noise`` (privacy accounting), ``audit`` and ``bench``."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: dp-microclip {epsilon,noise,audit,bench} [options]  (dp-microclip COMMAND --help for details)"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0
    command, rest = argv[0], argv[1:]
    if command in ("epsilon", "noise"):
        from accounting.cli import main as accounting_main

        return accounting_main([command, *rest]) or 0
    if command == "audit":
        from .audit import main as audit_main

        return audit_main(rest) or 0
    if command == "bench":
        from benchmarks.bench import main as bench_main

        return bench_main(rest) or 0
    print(f"unknown command {command!r}\n{usage}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())

"""The README's troubleshooting table, generated from the error model (pedseg.pipeline.errors).

Usage: python scripts/error_table.py            print the table
       python scripts/error_table.py --write    replace the table in README.md (between its markers)
       python scripts/error_table.py --check    exit 1 when README.md's table is not the generated one
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

from pedseg.pipeline.errors import error_classes

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- error-table:start (scripts/error_table.py --write) -->", "<!-- error-table:end -->"


def table() -> str:
    rows = ["| exit code | `error` in error.json | what went wrong | what to do |", "|---|---|---|---|"]
    rows += [f"| {cls.exit_code} | `{cls.kind}` | {cls.causes} | {cls.advice} |" for cls in error_classes()]
    return "\n".join(rows) + "\n"


def readme_with_table(text: str) -> str:
    pattern = re.compile(re.escape(START) + r"\n.*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"README.md lacks the markers {START} ... {END}")
    return pattern.sub(lambda _: f"{START}\n{table()}{END}", text)


if __name__ == "__main__":
    text = README.read_text(encoding="utf-8")
    if sys.argv[1:] == ["--write"]:
        README.write_text(readme_with_table(text), encoding="utf-8")
    elif sys.argv[1:] == ["--check"]:
        sys.exit(0 if readme_with_table(text) == text else "README.md's troubleshooting table is out of date: "
                 "run python scripts/error_table.py --write")
    else:
        sys.stdout.write(table())

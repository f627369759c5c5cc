"""The README's troubleshooting table, generated from the error model (pipeline/errors.py and its subclasses).

Usage: python scripts/error_table.py            print the table
       python scripts/error_table.py --write    replace the table in README.md (between its markers)
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import pacs.errors  # noqa: E402,F401 - registers the PACS adapter's error class
from pipeline.errors import PipelineError  # noqa: E402

README = ROOT / "README.md"
START, END = "<!-- error-table:start (scripts/error_table.py --write) -->", "<!-- error-table:end -->"


def error_classes() -> list[type[PipelineError]]:
    found, pending = [], [PipelineError]
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending += cls.__subclasses__()
    return sorted(found, key=lambda cls: cls.exit_code)


def table() -> str:
    rows = ["| exit code | `error` in error.json | what went wrong | what to do |", "|---|---|---|---|"]
    for cls in error_classes():
        # A class without its own causes (an adapter's) is described by its docstring.
        causes = cls.__dict__.get("causes") or " ".join((cls.__doc__ or "").split())
        advice = cls.__dict__.get("advice") or "Follow the hint that ends the message."
        rows.append(f"| {cls.exit_code} | `{cls.kind}` | {causes} | {advice} |")
    return "\n".join(rows) + "\n"


def readme_with_table(text: str) -> str:
    pattern = re.compile(re.escape(START) + r"\n.*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"README.md lacks the markers {START} ... {END}")
    return pattern.sub(lambda _: f"{START}\n{table()}{END}", text)


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        README.write_text(readme_with_table(README.read_text(encoding="utf-8")), encoding="utf-8")
    else:
        sys.stdout.write(table())

"""Adding a row to a table of bench/RESULTS.md: each benchmark owns one `## section` and its rows
stay under it, whatever other sections were written after it."""
from __future__ import annotations

import os


def add_row(path: str, section: str, header: str, row: str) -> None:
  """Append `row` (a markdown table line) to the table under `## {section}`, creating the
  section (with `header`: intro text and the table's two header lines) if it is missing."""
  text = open(path).read() if os.path.exists(path) else ""
  title = f"## {section}"
  row = row.rstrip("\n") + "\n"
  if title not in text:
    text = text.rstrip("\n") + f"\n\n{title}\n\n{header.rstrip()}\n{row}"
  else:
    start = text.index(title)
    end = text.find("\n## ", start + len(title))
    end = len(text) if end < 0 else end + 1
    body = text[start:end]
    lines = body.split("\n")
    last = max(i for i, line in enumerate(lines) if line.startswith("|"))  # last table line
    lines.insert(last + 1, row.rstrip("\n"))
    text = text[:start] + "\n".join(lines) + text[end:]
  with open(path, "w") as fh:
    fh.write(text)


def command(script: str) -> str:
  """The command line that ran `script` (its path relative to the current folder), for the table."""
  import sys
  return "python " + " ".join([os.path.relpath(script, os.getcwd())] + sys.argv[1:])

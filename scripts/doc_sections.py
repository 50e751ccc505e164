"""Writes one script's section of a generated markdown page, leaving the other scripts' sections."""

import pathlib
import re


def write_section(path: pathlib.Path, name: str, text: str, title: str = "# Results") -> None:
  """Replaces the text between `<!-- begin NAME -->` and `<!-- end NAME -->` in `path` (appends
  the section when absent; creates the page, headed by `title`, when missing)."""
  begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
  block = f"{begin}\n{text.strip()}\n{end}"
  page = path.read_text() if path.exists() else f"{title}\n"
  pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), flags=re.DOTALL)
  page = pattern.sub(lambda _: block, page) if pattern.search(page) else \
      page.rstrip() + "\n\n" + block + "\n"
  path.write_text(page)

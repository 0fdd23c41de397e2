"""Writing a benchmark's section of docs/benchmarks.md between its own markers."""

import os


def update_section(docs_path: str, markers: tuple[str, str], section: str) -> None:
    """Replace the text between `markers` (inclusive) with `section`, or append it."""
    text = open(docs_path).read() if os.path.exists(docs_path) else "# Benchmarks\n"
    if markers[0] in text:
        before, rest = text.split(markers[0], 1)
        text = before + section + rest.split(markers[1], 1)[1]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    with open(docs_path, "w") as f:
        f.write(text)

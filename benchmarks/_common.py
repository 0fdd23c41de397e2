"""Helpers shared by the benchmarks: their section of the docs, and memory readings."""

import os

# Where the protocol v1 scripts write their sections (docs/benchmarks.md is protocol v2's front page).
V1_DOCS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "benchmarks", "protocol-v1.md"
)


def save_figure(fig, path: str) -> None:
    """Lay out, write at 100 dpi and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def add_cell_flags(parser, output_dir: str, quick_help: str) -> None:
    """The flags every protocol v1 script takes: a smoke run, where results and the docs go,
    workers, the cells."""
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--output-dir", default=output_dir)
    parser.add_argument(
        "--docs",
        default=None,
        help="Markdown file to update (default: the v1 page; --quick: OUTPUT_DIR/benchmarks.md).",
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--backbones", nargs="+", default=["timm-resnet", "vit"])
    parser.add_argument("--ns", nargs="+", type=int, default=[50, 100, 500])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])


def add_switches(parser, switches: dict[str, str]) -> None:
    """`--flag` (store_true) with its help, for each entry of `switches`."""
    for flag, help_text in switches.items():
        parser.add_argument(flag, action="store_true", help=help_text)


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


def status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MB (Linux only)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def reset_peak_rss() -> None:
    """Reset VmHWM (the peak RSS) to the current RSS (Linux >= 4.0), to measure a phase's peak."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

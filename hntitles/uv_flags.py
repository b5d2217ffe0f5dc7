"""Translate pip's configuration into `uv pip install` flags, so uv installs what pip would.

`make setup` installs with uv when it can (parallel downloads and unpacking: the CPU stack takes
2.0 min instead of 2.5-4.1 min from empty caches on 2 shared cores) but uv does not read pip.conf or PIP_* variables. On
machines whose pip config adds a local wheel folder or mirror (e.g. a CPU torch wheel under
find-links), uv must see the same sources and pick across them the way pip does (the best version
over all indexes, `--index-strategy unsafe-best-match`), or it resolves a different torch.
Exit 1 when the config holds an option uv would not honour: the Makefile then installs with pip.

    pip config list | python -m hntitles.uv_flags          # -> --find-links /opt/wheels --index-strategy ...
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field

# pip option -> uv flag (each value of a space-separated list becomes one flag).
MAPPED = {"index-url": "--index-url", "extra-index-url": "--extra-index-url",
          "find-links": "--find-links", "constraint": "--constraint"}
# Options that do not change which files get installed.
HARMLESS = {"cert", "timeout", "default-timeout", "disable-pip-version-check", "progress-bar",
            "quiet", "verbose", "no-input", "root-user-action", "no-color", "retries", "cache-dir",
            "no-cache-dir", "no-warn-script-location"}
# pip's precedence: PIP_* variables over the [install] section over [global].
SECTIONS = {"global": 0, "install": 1, ":env:": 2}


@dataclass
class Args:
    config: str = field(default="-", metadata={"help": "Output of `pip config list` ('-' = stdin)."})


def parse_config(text: str) -> dict[str, str]:
    """`section.key='value'` lines -> {key: value}, the highest-precedence section winning."""
    best: dict[str, tuple[int, str]] = {}
    for line in text.splitlines():
        name, sep, value = line.partition("=")
        section, _, key = name.strip().rpartition(".")
        if not sep or section not in SECTIONS:
            continue  # sections of other commands (download, freeze, ...)
        rank = SECTIONS[section]
        if key not in best or rank >= best[key][0]:
            best[key] = (rank, " ".join(shlex.split(value)))
    return {key: value for key, (_, value) in best.items()}


def uv_flags(config: dict[str, str]) -> list[str]:
    """uv flags for `config`; ValueError names the first option uv cannot mirror.

    >>> uv_flags({"find-links": "/opt/wheels", "extra-index-url": "file:///a file:///b",
    ...           "cert": "/c"})  # doctest: +NORMALIZE_WHITESPACE
    ['--extra-index-url', 'file:///a', '--extra-index-url', 'file:///b', '--find-links', '/opt/wheels',
     '--index-strategy', 'unsafe-best-match']
    """
    flags = []
    for key, value in sorted(config.items()):
        if key in MAPPED:
            for item in value.split():
                flags += [MAPPED[key], item]
        elif key == "no-index" and value.lower() in ("1", "true", "yes", "on"):
            flags.append("--no-index")
        elif key not in HARMLESS:
            raise ValueError(f"pip option {key}={value!r} has no uv equivalent here")
    return flags + ["--index-strategy", "unsafe-best-match"]


def main(args: Args) -> int:
    text = sys.stdin.read() if args.config == "-" else open(args.config).read()
    try:
        print(shlex.join(uv_flags(parse_config(text))))
    except ValueError as e:
        print(f"uv_flags: {e}: install with pip", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="-", help=Args.__dataclass_fields__["config"].metadata["help"])
    sys.exit(main(Args(**vars(parser.parse_args()))))

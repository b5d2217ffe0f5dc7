"""Build the deliberately over-long fixture story in data/stories.jsonl.

The row is a (fictional) release announcement for "Tessellate 3.0", an invented
open source map server, followed by its full changelog since 2.0. The body is
far longer than 8192 tokens (well over 45,000 characters), so the prompt-length
filter in the data loader must drop it.

The text is composed deterministically (fixed seed, stdlib only) from original
hand-written templates, so re-running this script always produces the same body.

Usage:
    python data/make_long_story.py            # rewrite the long row in data/stories.jsonl in place
    python data/make_long_story.py --print    # print the body to stdout instead
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

LONG_TITLE = "Tessellate 3.0 released, with the full changelog since 2.0"
SEED = 20250121
MIN_CHARS = 45_000

INTRO = [
    "Tessellate 3.0 is out. It has been almost three years since 2.0, and in that time we "
    "shipped 28 releases, merged work from 214 contributors and closed more issues than we "
    "opened for the first time in the project's history. This post covers the highlights of "
    "3.0 and then, because several of you asked for it on the mailing list, reproduces the "
    "complete changelog for every release since 2.0, unedited.",
    "The headline feature of 3.0 is the new rendering pipeline. Styles are now compiled once "
    "into a bytecode program that the renderer executes per tile, instead of being interpreted "
    "for every feature. On our reference deployment, a city basemap with 41 layers, median "
    "tile render time dropped from 38 ms to 11 ms and peak memory per worker from 610 MB to "
    "230 MB. Vector tiles, WMS, WMTS and WFS all share the same pipeline now, so a style that "
    "works in one protocol works in all of them.",
    "3.0 also removes things. The legacy XML style format, deprecated since 2.4, is gone; "
    "run `tessellate style migrate` to convert old styles. Python 3.8 and PostGIS 2.5 are no "
    "longer supported. The Shapefile importer no longer guesses encodings, because it guessed "
    "wrong too often; set the encoding explicitly or provide a .cpg file.",
    "Upgrading from 2.9 should take most deployments under an hour. Read the migration guide "
    "first, back up your tile cache configuration, and expect the first start to take longer "
    "while styles are compiled. If something breaks, the issue tracker is the right place, and "
    "the release candidates' bug reports are already folded into the list below.",
    "What follows is the full changelog, oldest release first. Issue numbers refer to the project tracker.",
]

OUTRO = [
    "That is everything since 2.0. Thanks again to every contributor, packager and bug "
    "reporter, and to the three organizations that funded maintainer time during the 3.0 "
    "cycle. The 3.1 milestone is already open; the main themes are raster styling, better "
    "label collision handling for right-to-left scripts, and a rewrite of the admin UI.",
]

RELEASES = [
    ("2.1.0", "2022-03-15"),
    ("2.1.1", "2022-04-02"),
    ("2.2.0", "2022-05-24"),
    ("2.2.1", "2022-06-09"),
    ("2.2.2", "2022-07-01"),
    ("2.3.0", "2022-08-30"),
    ("2.3.1", "2022-09-21"),
    ("2.4.0", "2022-11-08"),
    ("2.4.1", "2022-12-06"),
    ("2.5.0", "2023-01-31"),
    ("2.5.1", "2023-02-22"),
    ("2.5.2", "2023-03-14"),
    ("2.6.0", "2023-04-25"),
    ("2.6.1", "2023-05-30"),
    ("2.7.0", "2023-07-11"),
    ("2.7.1", "2023-08-08"),
    ("2.7.2", "2023-09-05"),
    ("2.8.0", "2023-10-24"),
    ("2.8.1", "2023-11-28"),
    ("2.8.2", "2024-01-16"),
    ("2.9.0", "2024-03-12"),
    ("2.9.1", "2024-04-23"),
    ("2.9.2", "2024-06-18"),
    ("2.9.3", "2024-08-27"),
    ("3.0.0-rc1", "2024-10-15"),
    ("3.0.0-rc2", "2024-11-19"),
    ("3.0.0-rc3", "2024-12-17"),
    ("3.0.0", "2025-01-20"),
]

COMPONENTS = [
    "WMS endpoint",
    "WMTS endpoint",
    "WFS endpoint",
    "vector tile renderer",
    "raster reprojection",
    "PostGIS connector",
    "GeoPackage reader",
    "Shapefile importer",
    "style compiler",
    "label placement",
    "tile cache",
    "admin UI",
    "REST API",
    "CLI",
    "auth module",
    "GeoJSON exporter",
    "coordinate transforms",
    "COG reader",
    "elevation service",
    "metrics exporter",
    "config loader",
    "plugin loader",
    "SQL Server connector",
    "MBTiles writer",
    "legend generator",
    "feature info handler",
    "symbol library",
    "font renderer",
    "job scheduler",
    "S3 storage backend",
    "seeding tool",
    "OGC API Features",
    "time dimension support",
    "hillshade filter",
]

OPTIONS = [
    "max_layers",
    "cache_ttl",
    "worker_count",
    "render_timeout",
    "tile_buffer",
    "max_features",
    "allow_cors",
    "gzip_level",
    "seed_batch_size",
    "label_padding",
    "metatile_size",
    "pool_size",
    "read_only",
    "strict_srs",
    "font_dir",
    "s3_region",
    "log_format",
    "max_request_bytes",
    "retry_limit",
    "simplify_tolerance",
]

CRS = [
    "EPSG:3857",
    "EPSG:4326",
    "EPSG:3035",
    "EPSG:2154",
    "EPSG:25832",
    "EPSG:27700",
    "EPSG:3413",
    "EPSG:32633",
    "EPSG:4258",
    "EPSG:6933",
    "EPSG:3031",
    "EPSG:2056",
]

FORMATS = [
    "GeoJSON",
    "GeoPackage",
    "FlatGeobuf",
    "GeoParquet",
    "KML",
    "GPX",
    "CSV with WKT",
    "Shapefile",
    "MBTiles",
    "PMTiles",
    "Cloud Optimized GeoTIFF",
    "NetCDF",
]

HANDLES = [
    "mkowalczyk",
    "ayasato",
    "j-ferreira",
    "tobiaslind",
    "noor-s",
    "pgrant",
    "elif_k",
    "dvorakova",
    "hbeaumont",
    "r-achebe",
    "lindqvist-o",
    "fmoreau",
    "zhangwei-gis",
    "kpatel",
    "ostrander",
    "mariabelen",
    "yuki-h",
    "teodora-v",
]

DEPS = ["PROJ", "GDAL", "PostGIS", "GEOS", "Python", "SQLite", "libpng", "HarfBuzz"]

TECHNIQUES = [
    "caching parsed style expressions",
    "batching database round trips",
    "reusing rasterizer scratch buffers",
    "simplifying geometries before clipping",
    "skipping invisible layers earlier",
    "streaming rows instead of buffering them",
    "using a spatial index for label collisions",
    "precomputing glyph atlases",
    "avoiding a copy when encoding PNG rows",
    "parallelizing metatile slicing",
]

THINGS = [
    "cache hit ratio",
    "database pool saturation",
    "queue depth",
    "plugin status",
    "style compile errors",
    "disk usage of the tile cache",
]

SOURCES = [
    "environment variables",
    "a Vault server",
    "a mounted secrets file",
    "the AWS instance metadata service",
    "the system keyring",
]

LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]


def _pick(rng: random.Random, seq):
    return seq[rng.randrange(len(seq))]


def _entry(rng: random.Random, prev_version: str) -> str:
    comp = _pick(rng, COMPONENTS)
    kind = rng.choices(
        ["Fixed", "Added", "Performance", "Changed", "Security", "Deprecated", "Docs"],
        weights=[9, 6, 3, 3, 1, 1, 2],
    )[0]
    opt = _pick(rng, OPTIONS)
    n = rng.choice([2, 3, 4, 8, 16, 32, 64, 100, 128, 250, 256, 500, 1000, 4096])
    if kind == "Fixed":
        text = _pick(
            rng,
            [
                f"fixed a crash when a request named more than {n} layers",
                f"fixed wrong bounding boxes for geometries crossing the antimeridian in {_pick(rng, CRS)}",
                f"fixed a leak of about {rng.randint(2, 900)} KB per request when the client disconnected early",
                f"no longer ignores {opt} when it is set through an environment variable",
                f"fixed one-pixel seams between adjacent tiles at zoom level {rng.randint(3, 22)}",
                f"fixed a race that could serve stale tiles for up to {rng.randint(2, 120)} seconds "
                "after a style change",
                f"fixed handling of empty geometries in {_pick(rng, FORMATS)} input",
                f"fixed a deadlock when more than {n} workers reloaded configuration at once",
                f"fixed a regression from {prev_version} that rejected lowercase parameter names",
                f"fixed rounding of coordinates to {rng.randint(1, 9)} decimal places "
                "instead of the configured precision",
                f"fixed a 500 error when {opt} was set to zero",
                f"fixed a panic on {_pick(rng, FORMATS)} files larger than {rng.randint(2, 64)} GB",
            ],
        )
    elif kind == "Added":
        text = _pick(
            rng,
            [
                f"new {opt} setting (default {rng.randint(1, 600)})",
                f"can now read {_pick(rng, FORMATS)} input",
                f"added a health check that reports {_pick(rng, THINGS)}",
                f"can now load credentials from {_pick(rng, SOURCES)}",
                f"added support for {_pick(rng, CRS)}",
                f"new metric tessellate_{opt}_events_total",
                f"added a --dry-run flag that prints the {rng.randint(2, 40)} most expensive operations",
            ],
        )
    elif kind == "Performance":
        a = rng.randint(120, 4000)
        b = rng.randint(20, a - 10)
        text = _pick(
            rng,
            [
                f"{rng.randint(5, 70)}% faster on the standard benchmark by {_pick(rng, TECHNIQUES)}",
                f"peak memory down from {a} MB to {b} MB when rendering {n}k features",
                f"p99 latency down from {a} ms to {b} ms with {n} concurrent requests",
                f"startup time cut from {a} ms to {b} ms by {_pick(rng, TECHNIQUES)}",
            ],
        )
    elif kind == "Changed":
        a = rng.randint(1, 300)
        text = _pick(
            rng,
            [
                f"default {opt} changed from {a} to {a + rng.randint(1, 300)}",
                f"minimum supported {_pick(rng, DEPS)} version is now {rng.randint(2, 9)}.{rng.randint(0, 14)}",
                f"{_pick(rng, LEVELS)} log lines now include the request ID and the layer name",
                f"{opt} is now validated at startup instead of on first use",
                f"error responses now use the OGC exception format version {rng.randint(1, 3)}.{rng.randint(0, 3)}.0",
            ],
        )
    elif kind == "Security":
        who = _pick(rng, HANDLES)
        text = _pick(
            rng,
            [
                f"reject {_pick(rng, FORMATS)} input with more than {n} levels of nesting (reported by {who})",
                f"escape layer names in error pages to prevent reflected XSS (reported by {who})",
                f"fixed path traversal through a crafted {opt} parameter (reported by {who})",
                f"limit decompressed request bodies to {rng.randint(2, 256)} MB (reported by {who})",
            ],
        )
    elif kind == "Deprecated":
        text = f"{opt} is deprecated and will be removed in {rng.choice(['3.0', '3.1', '3.2', '4.0'])}"
    else:
        text = _pick(
            rng,
            [
                f"documented {opt} with {rng.randint(2, 9)} examples",
                f"new tutorial on serving {_pick(rng, FORMATS)} data behind a reverse proxy",
                f"rewrote the section on {_pick(rng, CRS)} axis order",
            ],
        )
    return f"- {kind}: {comp}: {text}"


def _release_intro(rng: random.Random, version: str, date: str, count: int) -> str:
    if version.startswith("3.0.0-rc"):
        return (
            f"Tessellate {version} ({date}). Release candidate for 3.0 with {count} changes; "
            f"please test against a copy of your production styles."
        )
    if version.endswith(".0"):
        focus = ", ".join(rng.sample(COMPONENTS, 3))
        return f"Tessellate {version} ({date}). Feature release with {count} changes, mostly in the {focus}."
    return f"Tessellate {version} ({date}). Bug-fix release with {count} changes."


def build_body() -> str:
    rng = random.Random(SEED)
    paragraphs = list(INTRO)
    seen: set[str] = set()
    issue = 4100
    prev = "2.0.0"
    for version, date in RELEASES:
        if version.endswith(".0") and "-rc" not in version:
            count = rng.randint(30, 44)
        else:
            count = rng.randint(10, 18)
        lines = []
        while len(lines) < count:
            line = _entry(rng, prev)
            if line in seen:
                continue
            seen.add(line)
            issue += rng.randint(1, 9)
            lines.append(f"{line} (#{issue})")
        paragraphs.append(_release_intro(rng, version, date, count) + "\n" + "\n".join(lines))
        prev = version
    paragraphs.extend(OUTRO)
    body = "\n\n".join(paragraphs)
    assert len(body) >= MIN_CHARS, len(body)
    return body


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--print", action="store_true", help="print the body instead of patching stories.jsonl")
    ap.add_argument("--path", default=str(Path(__file__).with_name("stories.jsonl")))
    args = ap.parse_args()

    body = build_body()
    if args.print:
        print(body)
        return

    path = Path(args.path)
    out_lines = []
    hits = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if row["title"] == LONG_TITLE:
            row["scraped_body"] = body
            line = json.dumps(row, ensure_ascii=False)
            hits += 1
        out_lines.append(line)
    if hits != 1:
        raise SystemExit(f"expected exactly one row titled {LONG_TITLE!r}, found {hits}")
    path.write_text("\n".join(out_lines) + "\n", encoding="utf-8")
    print(f"wrote {len(body):,} characters into the long row of {path}")


if __name__ == "__main__":
    main()

"""``headstart cache``: list or remove the feature cache's entries."""

from __future__ import annotations

import argparse
from typing import Any


def add_cache_parser(sub: Any) -> argparse.ArgumentParser:
    c = sub.add_parser("cache", help="show or remove cached features")
    c.add_argument("action", choices=["info", "clear"])
    c.add_argument("--dir", help="cache folder (default: $HEADSTART_CACHE or ~/.cache/headstart/features)")
    return c


def run_cache(args: argparse.Namespace) -> int:
    from headstart.training.cache import cache_entries, cache_root, clear_cache

    root = cache_root(args.dir)
    if args.action == "clear":
        print(f"removed {clear_cache(root)} cache entr(ies) from {root}")
        return 0
    entries = cache_entries(root)
    print(f"feature cache: {root}")
    for e in entries:
        print(f"  {e['key']}  {e['model']:<20} {e['part']:<10} {e['images']:>7} images  {e['views']} view(s)  "
              f"{e['bytes'] / 2**20:8.1f} MiB  {e['created']}  {e['source']}")
    print(f"{len(entries)} entr(ies), {sum(e['bytes'] for e in entries) / 2**20:.1f} MiB")
    return 0

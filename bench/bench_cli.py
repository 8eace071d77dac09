"""Command-line pieces every serving benchmark shares: name lists and where the results go."""
from __future__ import annotations

import json
from typing import Callable


def pick_names(arg: str | None, default, known, what: str) -> tuple:
    """``--what a,b``: the names given (each one of ``known``, unless it is None), or ``default``."""
    if arg is None:
        return tuple(default)
    names = tuple(x.strip() for x in arg.split(",") if x.strip())
    bad = [n for n in names if known is not None and n not in known]
    if bad or not names:
        raise SystemExit(f"--{what} {arg!r}: expected comma-separated names from {list(known or [])}")
    return names


def write_outputs(doc: dict, args, render_markdown: Callable[[dict], str],
                  write_plot: Callable[[dict, object], str]) -> None:
    """Print the table; write the JSON (fresh runs only), the markdown and the plot asked for."""
    table = render_markdown(doc)
    print(table)
    if args.json and not args.from_json:
        args.json.write_text(json.dumps(doc, indent=1))
        print(f"results written to {args.json}")
    if args.markdown:
        args.markdown.write_text(table)
        print(f"table written to {args.markdown}")
    if args.plot:
        print(write_plot(doc, args.plot))

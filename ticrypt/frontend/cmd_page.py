"""``ticrypt open``: the browser page of the local ticrypt-connect.

Asks connect (``POST /v1/page/link``, with the API token of its
``token_file``) for the page's URL with a fresh one-time sign-in link,
prints it and opens it in the default browser (Python's :mod:`webbrowser`);
``--print`` only prints it.  The link works once, for ``[page] link_ttl``.
"""

from __future__ import annotations

import argparse
from typing import Any

from ticrypt.frontend.cmd_tunnel import ConnectApi
from ticrypt.frontend.runner import CommandError, add_command, load_config, run_async


def register(subparsers: Any) -> None:
    p = add_command(subparsers, "open", cmd_open, "open the ticrypt page in your browser",
                    description="Ask your ticrypt-connect for the page's URL with a one-time "
                                "sign-in link, print it and open it in your browser.")
    p.add_argument("--print", dest="print_only", action="store_true",
                   help="only print the URL (open it yourself; it works once)")


def cmd_open(args: argparse.Namespace) -> int:
    import webbrowser  # here: see ticrypt.frontend.commands

    cfg = load_config(args)

    async def run(reactor: Any) -> int:
        answer = await ConnectApi(reactor, cfg).call("POST", "/v1/page/link", {})
        url = answer.get("url")
        if not isinstance(url, str) or not url.startswith("http://127.0.0.1:"):
            raise CommandError("cannot open the page", "ticrypt-connect answered without "
                               "the page's URL")
        print(url, flush=True)
        if not args.print_only and not webbrowser.open(url):
            print("(no browser could be started: open the URL above yourself)", flush=True)
        return 0

    return run_async("cannot open the page", run)

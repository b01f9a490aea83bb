"""Benchmark (a) over the secure channel: the user seals every message
(ticrypt.channel, AES-256-GCM), the VM end opens it; through ticrypt-proxy
versus one direct websocket.  Not a test.

    .venv/bin/python bench/bench_channel_proxy.py [--quick] [--plain]

Same processes as ``bench_proxy.py``: proxy (twistd), sink (VM end, opens
records), this process (user end, seals records).  Sizes are plaintext sizes.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench_proxy as bp  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402
from twisted.internet import defer, task  # noqa: E402

from ticrypt import identity  # noqa: E402
from ticrypt.channel import Established, SendMessage, UserChannel  # noqa: E402


async def run(reactor: Any, opts: argparse.Namespace) -> None:
    bp.raise_nofile(20000)
    opts.only = "a"
    b = bp.Bench(reactor, opts)
    try:
        await b.start()
        small, big = (20000, 1000) if opts.quick else (100000, 8000)
        for size, count in ((64, small), (65536, big)):
            rates = {}
            for via in ("proxy", "direct"):
                vm_key = identity.generate()
                vm_id = f"chan-{via}-{size}"
                seed = vm_key.private_bytes(serialization.Encoding.Raw,
                                            serialization.PrivateFormat.Raw,
                                            serialization.NoEncryption()).hex()

                async def setup(writer: Any, vm_key: Any = vm_key, vm_id: str = vm_id) -> Any:
                    ch = UserChannel(identity.generate(), vm_id, identity.public_bytes(vm_key))
                    for hello in ch.start():
                        text = hello.data
                        writer.sendMessage(text.encode() if isinstance(text, str) else text,
                                           not isinstance(text, str))
                    payload, _ = await writer.next()
                    established = False
                    for ev in ch.receive(payload.decode()):
                        if isinstance(ev, SendMessage):
                            data = ev.data
                            writer.sendMessage(data.encode() if isinstance(data, str) else data,
                                               not isinstance(data, str))
                        elif isinstance(ev, Established):
                            established = True
                    assert established
                    return ch.seal

                out = await b.throughput(size, count, via,
                                         sink_extra={"channel": {"vm_seed": seed,
                                                                 "vm_id": vm_id}},
                                         user_setup=setup, label="sealed")
                rates[via] = out["msgs_per_s"]
            b.record({"bench": "throughput-ratio", "payload": "sealed", "size": size,
                      "tls": b.tls, "proxy_over_direct": round(rates["proxy"]
                                                               / rates["direct"], 2)})
    finally:
        await b.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--plain", action="store_true")
    parser.add_argument("--max-buffered", default="256KiB")
    opts = parser.parse_args()
    task.react(lambda r: defer.ensureDeferred(run(r, opts)))


if __name__ == "__main__":
    main()

"""`python -m imagegen.dev.jimeng_sandbox --port N`: the jimeng sandbox as a process (stops on SIGTERM).

The bearer key clients must send comes from IMAGEGEN_SANDBOX_API_KEY (or `--api-key`, which `ps` shows)."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

from .server import SANDBOX_KEY_ENV, JimengSandbox, SandboxConfig, start_site


async def serve(sandbox: JimengSandbox, host: str, port: int) -> None:
    runner, _ = await start_site(sandbox, host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"jimeng sandbox listening on {sandbox.base_url}", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m imagegen.dev.jimeng_sandbox", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8300)
    parser.add_argument(
        "--api-key",
        default=os.environ.get(SANDBOX_KEY_ENV),
        help=f"the bearer key clients must send (default: ${SANDBOX_KEY_ENV})",
    )
    parser.add_argument("--latency", type=float, default=2.0, help="seconds per generation call")
    parser.add_argument("--jitter", type=float, default=1.0, help="extra random seconds per call, up to this")
    parser.add_argument("--image-size", type=int, default=512, help="pixels per side")
    parser.add_argument("--fail-rate", type=float, default=0.0, help="share of calls failing transiently")
    parser.add_argument("--public-base", default=None, help="base URL of image links (default: own address)")
    args = parser.parse_args()
    if not args.api_key:
        parser.error(f"set {SANDBOX_KEY_ENV} or pass --api-key")
    config = SandboxConfig(
        api_key=args.api_key,
        latency=args.latency,
        jitter=args.jitter,
        image_size=args.image_size,
        fail_rate=args.fail_rate,
        public_base=args.public_base,
    )
    try:
        asyncio.run(serve(JimengSandbox(config), args.host, args.port))
    except OSError as exc:
        sys.exit(f"jimeng sandbox: cannot listen on {args.host}:{args.port} ({exc.strerror}); pick another --port")


if __name__ == "__main__":
    main()

"""`python -m imagegen.dev.jimeng_sandbox --port N`: the jimeng sandbox as a process (stops on SIGTERM).

The bearer key clients must send comes from IMAGEGEN_SANDBOX_API_KEY (or `--api-key`, which `ps` shows); several
keys, comma-separated, are several accounts, and `--expired N` starts the session of the Nth one expired (every
call with it answers -2002), as a pool of accounts may hold a dead key."""

from __future__ import annotations

from aiohttp import web

from .server import SANDBOX_KEY_ENV, JimengSandbox, SandboxConfig, start_site
from .site import sandbox_parser, serve_process


def main() -> None:
    parser = sandbox_parser("python -m imagegen.dev.jimeng_sandbox", __doc__, SANDBOX_KEY_ENV, 8300)
    parser.add_argument("--latency", type=float, default=2.0, help="seconds per generation call")
    parser.add_argument("--jitter", type=float, default=1.0, help="extra random seconds per call, up to this")
    parser.add_argument("--image-size", type=int, default=512, help="pixels per side")
    parser.add_argument("--fail-rate", type=float, default=0.0, help="share of calls failing transiently")
    parser.add_argument("--public-base", default=None, help="base URL of image links (default: own address)")
    parser.add_argument(
        "--expired", type=int, action="append", default=[], help="position (from 1) of a key whose session expired"
    )
    args = parser.parse_args()
    keys = [key.strip() for key in (args.api_key or "").split(",") if key.strip()]
    if not keys:
        parser.error(f"set {SANDBOX_KEY_ENV} or pass --api-key")
    if any(not 1 <= position <= len(keys) for position in args.expired):
        parser.error(f"--expired takes a key's position, 1 to {len(keys)}")
    config = SandboxConfig(
        api_key=keys[0],
        extra_keys=tuple(keys[1:]),
        latency=args.latency,
        jitter=args.jitter,
        image_size=args.image_size,
        fail_rate=args.fail_rate,
        public_base=args.public_base,
    )
    sandbox = JimengSandbox(config)
    for position in args.expired:
        sandbox.expire_key(keys[position - 1])

    async def start(host: str, port: int) -> web.AppRunner:
        runner, _ = await start_site(sandbox, host, port)
        return runner

    serve_process(start, "jimeng sandbox", args.host, args.port)


if __name__ == "__main__":
    main()

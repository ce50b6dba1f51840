"""`python -m imagegen.dev.ark_sandbox --port N`: the Ark sandbox as a process (stops on SIGTERM), for the local
stack. Its ARK_BASE_URL is `http://HOST:PORT/api/v3`; the bearer key clients must send comes from
IMAGEGEN_ARK_SANDBOX_API_KEY (or `--api-key`, which `ps` shows)."""

from __future__ import annotations

import functools

from imagegen.dev.jimeng_sandbox.site import sandbox_parser, serve_process

from .server import ARK_SANDBOX_KEY_ENV, ArkSandbox, ArkSandboxConfig, start_site


def main() -> None:
    parser = sandbox_parser("python -m imagegen.dev.ark_sandbox", __doc__, ARK_SANDBOX_KEY_ENV, 8301)
    parser.add_argument("--latency", type=float, default=1.0, help="seconds per generation call")
    args = parser.parse_args()
    if not args.api_key:
        parser.error(f"set {ARK_SANDBOX_KEY_ENV} or pass --api-key")
    sandbox = ArkSandbox(ArkSandboxConfig(api_key=args.api_key, latency=args.latency))
    serve_process(functools.partial(start_site, sandbox), "Ark sandbox", args.host, args.port)


if __name__ == "__main__":
    main()

"""One image download -> bucket upload in a fresh process; prints its peak memory and time as JSON.

`stream`: imagegen's way (`Storage.upload_image`, one part in memory at a time).
`buffered`: the old way (read the whole image, then one PUT).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import time

import aiohttp

from imagegen.download import open_image
from imagegen.settings import Settings
from imagegen.storage import Storage, open_s3_client


async def transfer(mode: str, settings: Settings, url: str, key: str) -> int:
    async with aiohttp.ClientSession() as http, open_s3_client(settings) as s3:
        storage = Storage(s3, settings)
        async with open_image(http, url, max_bytes=1 << 34, time_limit=600) as image:
            if mode == "stream":
                return await storage.upload_image(key, image)
            body = await image.read(-1)
            await s3.put_object(Bucket=settings.tos_bucket, Key=key, Body=body, ContentType=image.image_type.value)
            return len(body)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["stream", "buffered"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--access-key", required=True)
    parser.add_argument("--secret-key", required=True)
    args = parser.parse_args()
    settings = Settings(
        _env_file=None,
        tos_endpoint=args.endpoint,
        tos_bucket=args.bucket,
        tos_access_key_id=args.access_key,
        tos_access_key_secret=args.secret_key,
        tos_addressing_style="path",
        tos_region="us-east-1",
    )
    started = time.perf_counter()
    size = asyncio.run(transfer(args.mode, settings, args.url, f"bench/{args.mode}.png"))
    elapsed = time.perf_counter() - started
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps({"mode": args.mode, "bytes": size, "seconds": round(elapsed, 3), "peak_rss_mib": round(peak_mib, 1)})
    )


if __name__ == "__main__":
    main()

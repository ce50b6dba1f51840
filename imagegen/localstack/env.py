"""The imagegen settings that point a worker or a command at a local stack."""

from __future__ import annotations


def stack_env(
    *,
    redis_port: int,
    jimeng_url: str,
    jimeng_key: str,
    s3_url: str,
    bucket: str,
    s3_access_key: str,
    s3_secret_key: str,
    pocketbase_url: str,
    pocketbase_email: str,
    pocketbase_password: str,
) -> dict[str, str]:
    """Settings (as environment variables) for local Redis, PocketBase and SeaweedFS and the jimeng fake."""
    return {
        "REDIS_HOST": "127.0.0.1",
        "REDIS_PORT": str(redis_port),
        "JIMENG_API_KEY": jimeng_key,
        "JIMENG_API_URL": jimeng_url,
        "TOS_BUCKET": bucket,
        "TOS_ACCESS_KEY_ID": s3_access_key,
        "TOS_ACCESS_KEY_SECRET": s3_secret_key,
        "TOS_REGION": "us-east-1",
        "TOS_ENDPOINT": s3_url,
        "TOS_ADDRESSING_STYLE": "path",
        "POCKETBASE_URL": pocketbase_url,
        "POCKETBASE_EMAIL": pocketbase_email,
        "POCKETBASE_PASSWORD": pocketbase_password,
    }

"""`imagegen check`: one probe per configured service, none of which costs a generation credit, then the
collection's fields (see `schema`): one line per problem with its fix, one per field whose adding gains
something."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
from arq import create_pool
from redis.exceptions import RedisError

from imagegen.clients.ark import ArkClient
from imagegen.clients.jimeng import AccountRoutes
from imagegen.clients.pocketbase import PocketBaseClient
from imagegen.clients.schema import SchemaReport
from imagegen.clients.storage import Storage, open_s3_client
from imagegen.errors import ImagegenError, excerpt
from imagegen.queue.accounts import accounts_of
from imagegen.queue.connections import redis_settings
from imagegen.settings import Settings

CHECK_TIMEOUT = 15.0


@dataclass(frozen=True)
class ServiceCheck:
    service: str
    ok: bool
    detail: str


async def check_redis(settings: Settings, http: aiohttp.ClientSession) -> str:
    try:
        redis = await create_pool(redis_settings(settings, ride_out_outages=False))
    except (RedisError, OSError) as exc:
        raise ImagegenError(
            f"cannot connect to {settings.redis_location()} ({type(exc).__name__}); check the REDIS_* settings"
        ) from None
    try:
        queued = await redis.zcard(settings.queue_name)
    finally:
        await redis.aclose()
    return f"{settings.redis_location()}, {queued} jobs in {settings.queue_name}"


async def check_pocketbase(settings: Settings, http: aiohttp.ClientSession) -> str:
    await PocketBaseClient(http, settings).check()
    return (
        f"{settings.pocketbase_url}, logged in as {settings.pocketbase_email}, "
        f"collection {settings.pocketbase_collection}"
    )


async def check_storage(settings: Settings, http: aiohttp.ClientSession) -> str:
    if not settings.tos_bucket:
        raise ImagegenError("TOS_BUCKET is not set")
    async with open_s3_client(settings) as client:
        await Storage(client, settings).check()
    return f"bucket {settings.tos_bucket} at {settings.tos_endpoint}, public URLs {settings.tos_public_base_url}/..."


async def check_jimeng(settings: Settings, http: aiohttp.ClientSession) -> str:
    """Reachability and key acceptance through the model list (with the first key), then every key's session:
    generating an image would cost credits."""
    if not settings.jimeng_keys():
        raise ImagegenError("JIMENG_API_KEY is not set")
    url = f"{settings.jimeng_api_url}/models"
    headers = {"Authorization": f"Bearer {settings.jimeng_keys()[0].get_secret_value()}"}
    try:
        async with http.get(url, headers=headers) as response:
            body = await response.text(errors="replace")
    except aiohttp.ClientError as exc:
        raise ImagegenError(f"cannot reach {settings.jimeng_api_url} ({type(exc).__name__})") from None
    if response.status in (401, 403):
        raise ImagegenError(f"{url} refused the key (HTTP {response.status}); check JIMENG_API_KEY")
    if response.status >= 500:
        raise ImagegenError(f"{url} answered HTTP {response.status} ({excerpt(body, 80)})")
    verdict = await _check_keys(settings, http)
    return (
        f"{settings.jimeng_api_url} reachable "
        f"(model {settings.jimeng_model}, {settings.jimeng_ratio}, {settings.jimeng_resolution}); {verdict}"
    )


async def _check_keys(settings: Settings, http: aiohttp.ClientSession) -> str:
    """Each account's session through the proxy's free `/token/check`; ImagegenError naming the dead ones."""
    accounts = accounts_of(settings.jimeng_keys())
    routes = AccountRoutes(http, settings)
    dead = []
    for account in accounts:
        live = await routes.live(account.key)
        if live is None:
            return f"{len(accounts)} keys not verified (the proxy's /token/check did not answer)"
        if not live:
            dead.append(account.label)
    if dead:
        raise ImagegenError(
            f"{', '.join(dead)} {'is' if len(dead) == 1 else 'are'} dead: replace the expired session id in "
            f"JIMENG_API_KEY ({len(accounts) - len(dead)} of {len(accounts)} keys live)"
        )
    return f"{len(accounts)} of {len(accounts)} keys live"


async def check_ark(settings: Settings, http: aiohttp.ClientSession) -> str:
    """The key and ARK_MODEL through a request that can't bill (see `ArkClient.check`)."""
    return await ArkClient(http, settings).check()


CHECKS: dict[str, Callable[[Settings, aiohttp.ClientSession], Awaitable[str]]] = {
    "redis": check_redis,
    "pocketbase": check_pocketbase,
    "storage": check_storage,
    "jimeng": check_jimeng,
    "ark": check_ark,
}


def services_to_check(settings: Settings) -> list[str]:
    """Every service the settings use: jimeng and Ark only when IMAGE_PROVIDERS names them."""
    return [name for name in CHECKS if name not in ("jimeng", "ark") or name in settings.providers()]


async def _run_one(name: str, settings: Settings, http: aiohttp.ClientSession) -> ServiceCheck:
    try:
        detail = await asyncio.wait_for(CHECKS[name](settings, http), CHECK_TIMEOUT)
    except TimeoutError:
        return ServiceCheck(name, False, f"no answer within {CHECK_TIMEOUT:.0f} s")
    except ImagegenError as exc:
        return ServiceCheck(name, False, str(exc))
    return ServiceCheck(name, True, detail)


@dataclass(frozen=True)
class Checkup:
    """What `imagegen check` found: each service, and the collection's fields once PocketBase answered."""

    services: list[ServiceCheck]
    collection: SchemaReport | None

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.services) and not (self.collection is not None and self.collection.problems)


async def check_services(settings: Settings) -> Checkup:
    """Probe every service at once, then the collection's schema; each result says what is wrong in one line."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CHECK_TIMEOUT)) as http:
        services = list(await asyncio.gather(*(_run_one(name, settings, http) for name in services_to_check(settings))))
        collection = None
        if next(s for s in services if s.service == "pocketbase").ok:
            try:
                collection = await asyncio.wait_for(PocketBaseClient(http, settings).schema_report(), CHECK_TIMEOUT)
            except (TimeoutError, ImagegenError) as exc:
                services.append(ServiceCheck("collection", False, str(exc) or "no answer in time"))
        return Checkup(services, collection)

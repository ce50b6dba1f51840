"""The local default stack: everything imagegen needs on this machine, run by supervisord.

`python -m imagegen.dev.devstack up` starts what `.env` does not configure (Redis, PocketBase with the prompts
collection, a SeaweedFS S3 server, the jimeng sandbox) plus the worker, watching a local collection
(POCKETBASE_WATCH, unless `.env` says otherwise), and the dashboard (`imagegen serve`); it seeds sample prompts
into a local PocketBase, queues every pending record and prints each record with its image URL. Then, on a
local PocketBase, it creates one more record through PocketBase's REST API and shows the watching worker bring
it to `done` with no command. Its last lines are the dashboard's URL and the commands for status, inspect and
stop, as they run from the project directory.
`python -m imagegen.dev.devstack down` stops it all; the data stays in `.stack/` for the next `up`.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import click
from dotenv import dotenv_values

from imagegen.clients.download import sniff_image_type
from imagegen.clients.pocketbase import PocketBaseClient
from imagegen.errors import ImagegenError
from imagegen.logs import setup_logging
from imagegen.models import PromptRecord, RecordStatus
from imagegen.ops.control import EnqueueOutcome, EnqueueTally, open_control
from imagegen.settings import Settings, load_settings

from .jimeng_sandbox import SANDBOX_KEY_ENV
from .localstack import (
    LocalStackError,
    ServiceSpec,
    child_env,
    create_collection,
    ensure_bucket,
    free_port,
    pocketbase_spec,
    redis_spec,
    seaweed_spec,
)

SAMPLE_PROMPTS = (
    "a red fox curled up asleep in fresh snow, soft morning light",
    "an old lighthouse on a cliff during a storm, oil painting",
    "a bowl of ramen with steam rising, top-down food photography",
    "a paper boat floating on a rain puddle in a city street",
    "a tiny astronaut tending a garden on the moon, children's book illustration",
    "sunflowers in a blue vase on a wooden table, impressionist style",
)
WATCH_PROMPT = "a hot air balloon over a lavender field at sunset, created through the REST API"
WAIT_SECONDS = 900
DASHBOARD_PORT = 8300  # WEB_PORT's default: the demo's dashboard takes it when it is free
DASHBOARD_WAIT = 30.0


@dataclass
class StackPaths:
    root: Path

    @property
    def state(self) -> Path:
        return self.root / ".stack"

    @property
    def conf(self) -> Path:
        return self.state / "supervisord.conf"

    @property
    def ports_file(self) -> Path:
        return self.state / "stack.json"

    @property
    def env_file(self) -> Path:
        return self.state / "imagegen.env"

    @property
    def sockets_file(self) -> Path:
        return self.state / "sockets.json"

    @property
    def pidfile(self) -> Path:
        return self.state / "supervisord.pid"

    @property
    def logs(self) -> Path:
        return self.root / "logs"


def _configured(env_file: Path) -> set[str]:
    """Names set (non-empty) in the environment or `.env`: those services are real, not local."""
    values = {k: v for k, v in dotenv_values(env_file).items() if v} if env_file.exists() else {}
    values.update({k: v for k, v in os.environ.items() if v})
    return set(values)


def _load_state(paths: StackPaths) -> dict[str, str]:
    if paths.ports_file.exists():
        state: dict[str, str] = json.loads(paths.ports_file.read_text())
        if "web_port" not in state:  # a stack made before the demo served its dashboard
            state["web_port"] = str(free_port(preferred=DASHBOARD_PORT))
            paths.ports_file.write_text(json.dumps(state, indent=2))
        return state
    state = {
        "web_port": str(free_port(preferred=DASHBOARD_PORT)),
        "redis_port": str(free_port()),
        "pocketbase_port": str(free_port()),
        "s3_port": str(free_port(also_free_offset=10000, below=55535)),
        "jimeng_port": str(free_port()),
        "redis_password": secrets.token_hex(12),
        "pocketbase_password": secrets.token_hex(12),
        "s3_access_key": "imagegen-local",
        "s3_secret_key": secrets.token_hex(16),
        "jimeng_key": "sandbox-" + secrets.token_hex(8),
    }
    paths.state.mkdir(parents=True, exist_ok=True)
    paths.ports_file.write_text(json.dumps(state, indent=2))
    paths.ports_file.chmod(0o600)
    return state


def plan_stack(paths: StackPaths, configured: set[str]) -> tuple[list[ServiceSpec], dict[str, str]]:
    """The local services to run and the settings that point the worker and CLI at them."""
    state = _load_state(paths)
    data = paths.state / "data"
    specs: list[ServiceSpec] = []
    # The demo shows records queued as they are created, on its own PocketBase only: a PocketBase named in
    # `.env` is watched only if `.env` says so (watching starts paid generations for every new record).
    watch = not {"POCKETBASE_WATCH", "POCKETBASE_EMAIL"} & configured
    env: dict[str, str] = {"POCKETBASE_WATCH": "true"} if watch else {}
    if "WEB_PORT" not in configured:
        env["WEB_PORT"] = state["web_port"]
    if "REDIS_HOST" not in configured:
        specs.append(redis_spec(data / "redis", int(state["redis_port"]), password=state["redis_password"]))
        env |= {"REDIS_HOST": "127.0.0.1", "REDIS_PORT": state["redis_port"], "REDIS_PASSWORD": state["redis_password"]}
    if "POCKETBASE_EMAIL" not in configured:
        email = "admin@imagegen.local"
        specs.append(
            pocketbase_spec(
                data / "pocketbase",
                int(state["pocketbase_port"]),
                admin_email=email,
                admin_password=state["pocketbase_password"],
            )
        )
        env |= {
            "POCKETBASE_URL": f"http://127.0.0.1:{state['pocketbase_port']}",
            "POCKETBASE_EMAIL": email,
            "POCKETBASE_PASSWORD": state["pocketbase_password"],
        }
    if "TOS_ACCESS_KEY_ID" not in configured:
        specs.append(
            seaweed_spec(
                data / "seaweed",
                int(state["s3_port"]),
                access_key=state["s3_access_key"],
                secret_key=state["s3_secret_key"],
            )
        )
        env |= {
            "TOS_BUCKET": "imagegen-local",
            "TOS_ACCESS_KEY_ID": state["s3_access_key"],
            "TOS_ACCESS_KEY_SECRET": state["s3_secret_key"],
            "TOS_ENDPOINT": f"http://127.0.0.1:{state['s3_port']}",
            "TOS_REGION": "us-east-1",
            "TOS_ADDRESSING_STYLE": "path",
            "TOS_PUBLIC_BASE_URL": "",
        }
    if "JIMENG_API_KEY" not in configured:
        port = state["jimeng_port"]
        argv = [
            sys.executable,
            "-m",
            "imagegen.dev.jimeng_sandbox",
            "--host",
            "127.0.0.1",
            "--port",
            port,
            "--latency",
            "1.5",
            "--image-size",
            "512",
        ]
        specs.append(
            ServiceSpec(
                name="jimeng-sandbox",
                argv=argv,
                # Only what it needs; the key by environment, so it shows neither in `ps` nor in the caller's env.
                env=child_env(**{SANDBOX_KEY_ENV: state["jimeng_key"]}),
                cwd=paths.root,
                log_path=paths.state / "logs" / "jimeng-sandbox.log",
                probe=lambda: _http_ok(f"http://127.0.0.1:{port}/_sandbox/stats"),
                start_timeout=20,
                stop_timeout=5,
                url=f"http://127.0.0.1:{port}/v1",
            )
        )
        env |= {"JIMENG_API_KEY": state["jimeng_key"], "JIMENG_API_URL": f"http://127.0.0.1:{port}/v1"}
    return specs, env


def _http_ok(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _quote_env(env: dict[str, str]) -> str:
    return ",".join(f'{k}="{v.replace("%", "%%").replace(chr(34), "")}"' for k, v in sorted(env.items()))


def supervisord_conf(paths: StackPaths, specs: list[ServiceSpec], env: dict[str, str], workers: int) -> str:
    """One supervisord file running the local services and the worker processes."""
    bin_dir = Path(sys.executable).parent
    sections = [
        f"[unix_http_server]\nfile={paths.state}/supervisor.sock\n",
        f"[supervisord]\nlogfile={paths.state}/logs/supervisord.log\npidfile={paths.pidfile}\ndirectory={paths.root}\n",
        "[rpcinterface:supervisor]\nsupervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n",
        f"[supervisorctl]\nserverurl=unix://{paths.state}/supervisor.sock\n",
    ]
    for spec in specs:
        command = " ".join(_shell_word(a) for a in spec.argv)
        sections.append(
            f"[program:{spec.name}]\ncommand={command}\ndirectory={spec.cwd}\nenvironment={_quote_env(spec.env)}\n"
            f"priority=10\nautorestart=true\nstartsecs=1\nstopwaitsecs={int(spec.stop_timeout) + 5}\n"
            f"stopasgroup=true\nkillasgroup=true\nredirect_stderr=true\nstdout_logfile={spec.log_path}\n"
        )
    sections.append(
        _imagegen_program(
            paths,
            "imagegen-worker",
            f"{bin_dir}/imagegen worker",
            env,
            logs="worker-%(process_num)d",
            options=f"process_name=%(program_name)s-%(process_num)d\nnumprocs={workers}\npriority=50\n"
            "startsecs=3\nstopwaitsecs=780\n",
        )
    )
    # The dashboard and HTTP API (WEB_HOST:WEB_PORT, loopback unless API_TOKEN is set), after the workers.
    sections.append(
        _imagegen_program(
            paths,
            "imagegen-web",
            f"{bin_dir}/imagegen serve",
            env,
            logs="web",
            options="priority=60\nstartsecs=2\nstopwaitsecs=15\n",
        )
    )
    return "\n".join(sections)


def _imagegen_program(
    paths: StackPaths, name: str, command: str, env: dict[str, str], *, logs: str, options: str
) -> str:
    """A supervisord program of imagegen's own, with the stack's settings and its logs in logs/."""
    return (
        f"[program:{name}]\ncommand={command}\n{options}directory={paths.root}\nenvironment={_quote_env(env)}\n"
        "autorestart=true\nstartretries=20\nstopsignal=TERM\nstopasgroup=true\nkillasgroup=true\n"
        f"stdout_logfile={paths.logs}/{logs}-out.log\nstderr_logfile={paths.logs}/{logs}-error.log\n"
    )


def _shell_word(word: str) -> str:
    return word if word and all(c.isalnum() or c in "-_./:=@" for c in word) else json.dumps(word)


def _running(paths: StackPaths) -> bool:
    try:
        pid = int(paths.pidfile.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return True


def _supervisor_bin(name: str) -> str:
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise click.ClickException(f"{name} not found; run `make setup` first")
    return found


def start_stack(paths: StackPaths, specs: list[ServiceSpec], env: dict[str, str], workers: int) -> None:
    for directory in (paths.state / "logs", paths.logs):
        directory.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
    if _running(paths):
        click.echo("  the stack is already running; reusing it")
    else:
        paths.conf.write_text(supervisord_conf(paths, specs, env, workers))
        paths.conf.chmod(0o600)
        paths.env_file.write_text("".join(f"{k}={v}\n" for k, v in sorted(env.items())))
        paths.env_file.chmod(0o600)
        sockets = [str(p) for spec in specs for p in spec.stale_sockets]
        paths.sockets_file.write_text(json.dumps(sockets))
        subprocess.run([_supervisor_bin("supervisord"), "-c", str(paths.conf)], check=True)
    for spec in specs:
        deadline = time.monotonic() + spec.start_timeout
        while not spec.probe():
            if time.monotonic() > deadline:
                raise click.ClickException(f"{spec.name} did not start; see {spec.log_path}")
            time.sleep(0.1)
        click.echo(f"  {spec.name:<15} ready at {spec.url.split('@')[-1]}")


async def seed_and_run(settings: Settings, seed: bool, wait: float) -> list[PromptRecord]:
    """Seed sample prompts into an empty local collection, queue the pending ones, wait for them."""
    async with open_control(settings) as control:
        pb = control.pocketbase
        if seed and not [r async for r in pb.iter_records('id != ""', page_size=1)]:
            for prompt in SAMPLE_PROMPTS:
                await pb.create_record(prompt, "blurry, low quality")
            click.echo(f"  seeded {len(SAMPLE_PROMPTS)} sample prompts")
        ids: list[str] = []
        tally = EnqueueTally()
        async for page in control.enqueue_pending():
            tally.add(page)
            ids += [r.prompt_id for r in page]
        already = tally.counts.get(EnqueueOutcome.ALREADY_QUEUED.value, 0)
        watched = f" ({already} already queued by the watching worker as they were created)" if already else ""
        click.echo(
            f"  queued {tally.counts.get(EnqueueOutcome.QUEUED.value, 0)} of {len(ids)} pending records{watched}"
        )
        loop = asyncio.get_running_loop()
        end = loop.time() + wait
        while True:
            current = [await pb.get_record(i) for i in ids]
            waiting = [r for r in current if r.status not in (RecordStatus.DONE, RecordStatus.FAILED)]
            if not waiting or loop.time() > end:
                break
            await asyncio.sleep(1)
        return [r async for r in pb.iter_records('id != ""')]


async def watch_demo(settings: Settings, wait: float) -> PromptRecord:
    """Create one record through PocketBase's REST API and wait, running no command, until the watching
    worker has brought it to an end."""
    async with aiohttp.ClientSession() as http:
        pb = PocketBaseClient(http, settings)
        record = await pb.create_record(WATCH_PROMPT, "blurry, low quality")
        click.echo(
            f"\n  created {record.id} with POST /api/collections/{pb.collection}/records (PocketBase's REST API); "
            "no command queues it"
        )
        loop = asyncio.get_running_loop()
        start = loop.time()
        while True:
            record = await pb.get_record(record.id)
            if record.status in (RecordStatus.DONE, RecordStatus.FAILED) or loop.time() > start + wait:
                break
            await asyncio.sleep(0.5)
        click.echo(f"  the watching worker took it: {record.status or 'pending'} after {loop.time() - start:.1f} s")
        return record


async def describe_url(http: aiohttp.ClientSession, url: str) -> str:
    try:
        async with http.get(url) as response:
            body = await response.read()
    except aiohttp.ClientError as exc:
        return f"unreachable ({type(exc).__name__})"
    kind = sniff_image_type(body[:16])
    return f"HTTP {response.status}, {kind.value if kind else 'not an image'}, {len(body) // 1024} KiB"


async def print_records(records: list[PromptRecord]) -> None:
    async with aiohttp.ClientSession() as http:
        for record in records:
            click.echo(f"\n{record.id}  [{record.status or 'pending'}]  {record.prompt[:70]}")
            if record.error:
                click.echo(f"    error: {record.error}")
            for url in record.images or ([record.image_url] if record.image_url else []):
                click.echo(f"    {url}  ({await describe_url(http, url)})")


@click.group()
def main() -> None:
    """The local default stack for imagegen."""


@main.command()
@click.option("--workers", default=1, show_default=True, help="Worker processes under supervisord.")
@click.option("--wait", default=WAIT_SECONDS, show_default=True, help="Seconds to wait for the records.")
def up(workers: int, wait: float) -> None:
    """Start the stack, queue every pending prompt and print the records with their image URLs."""
    paths = StackPaths(Path.cwd())
    configured = _configured(paths.root / ".env")
    try:
        specs, env = plan_stack(paths, configured)
    except LocalStackError as exc:
        raise click.ClickException(str(exc)) from None
    local = ", ".join(s.name for s in specs) or "none (all configured in .env)"
    click.echo(f"imagegen local stack - local services: {local}")
    start_stack(paths, specs, env, workers)
    os.environ.update(env)
    try:
        settings = load_settings(paths.root / ".env")
        setup_logging("ERROR", settings.secrets())
        if "TOS_ACCESS_KEY_ID" not in configured:
            asyncio.run(
                ensure_bucket(
                    settings.tos_endpoint,
                    settings.tos_access_key_id,
                    settings.tos_access_key_secret.get_secret_value(),
                    settings.tos_bucket,
                )
            )
        if "POCKETBASE_EMAIL" not in configured:
            asyncio.run(create_collection(settings))
        records = asyncio.run(seed_and_run(settings, "POCKETBASE_EMAIL" not in configured, wait))
        asyncio.run(print_records(records))
        watched: list[PromptRecord] = []
        if settings.pocketbase_watch and "POCKETBASE_EMAIL" not in configured:
            watched.append(asyncio.run(watch_demo(settings, wait)))
            asyncio.run(print_records(watched))
    except ImagegenError as exc:
        raise click.ClickException(str(exc)) from None
    shown = records + watched
    done = sum(r.status == RecordStatus.DONE for r in shown)
    click.echo(f"\n{done} of {len(shown)} records done. Worker logs: logs/worker-0-out.log, logs/worker-0-error.log")
    if watched:
        reached = "reached done" if watched[0].status == RecordStatus.DONE else "did NOT reach done"
        click.echo(f"The record created through the REST API {reached} with no command (POCKETBASE_WATCH=true).")
    print_next_steps(paths, settings, shown[-1].id if shown else "<id>")
    if done < len(shown):
        sys.exit(1)


def _imagegen_command(paths: StackPaths) -> str:
    """`imagegen` with its settings files, as it runs from the project directory (relative to it when the
    virtualenv is inside it: `.venv/bin/imagegen`)."""
    script = Path(sys.executable).parent / "imagegen"
    with suppress(ValueError):
        script = script.relative_to(paths.root)
    user_env = "--env-file .env " if (paths.root / ".env").exists() else ""
    return f"{script} {user_env}--env-file {paths.env_file.relative_to(paths.root)}"


def print_next_steps(paths: StackPaths, settings: Settings, record_id: str) -> None:
    """The last lines: the dashboard's URL (once it answers) and the commands to look at and stop the stack."""
    url = f"http://{settings.web_host}:{settings.web_port}/"
    deadline = time.monotonic() + DASHBOARD_WAIT
    while not (answered := _http_ok(f"{url}healthz")) and time.monotonic() < deadline:
        time.sleep(0.2)
    note = "" if answered else f"  (not answering yet: see {paths.logs.name}/web-error.log)"
    command = _imagegen_command(paths)
    click.echo(
        f"\nDashboard: {url}{note}\n"
        f"Status:    {command} status\n"
        f"Inspect:   {command} inspect {record_id}\n"
        "Stop:      make demo-stop"
    )


@main.command()
def down() -> None:
    """Stop the stack (its data stays in .stack/)."""
    paths = StackPaths(Path.cwd())
    if not _running(paths):
        click.echo("the local stack is not running")
        return
    subprocess.run([_supervisor_bin("supervisorctl"), "-c", str(paths.conf), "shutdown"], check=False)
    deadline = time.monotonic() + 200
    while _running(paths) and time.monotonic() < deadline:
        time.sleep(0.2)
    # SeaweedFS leaves gRPC sockets in the temp directory even after a clean stop.
    if paths.sockets_file.exists():
        for socket_path in json.loads(paths.sockets_file.read_text()):
            Path(socket_path).unlink(missing_ok=True)
        paths.sockets_file.unlink()
    click.echo("local stack stopped")


if __name__ == "__main__":
    main()

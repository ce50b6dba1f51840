"""The `imagegen` command: a thin shell over `control`, `checks` and `oneoff`.

Exit codes: 0 success; 1 some ids were not found, invalid or failed; 2 bad settings or usage;
3 a service could not be reached or refused us; 4 today's JIMENG_DAILY_LIMIT is used up (`generate`).
Expected failures print one line, never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, NoReturn

import aiohttp
import click

from imagegen.clients.layout import FieldLayout
from imagegen.clients.pocketbase import PocketBaseClient
from imagegen.errors import ConfigError, DailyLimitReached, ImagegenError
from imagegen.logs import setup_logging
from imagegen.ops.accounts_report import account_lines, accounts_summary, accounts_with_credits, format_accounts
from imagegen.ops.answers import AccountsAnswer, EnqueueResultAnswer, QueueAnswer, TaskAnswer
from imagegen.ops.collection_setup import setup_collection
from imagegen.ops.control import Control, EnqueueReport, EnqueueTally, JobReport, StatusReport, open_control
from imagegen.progress import Progress
from imagegen.queue.accounts import AccountState
from imagegen.queue.priority import PRIORITY_RULE, check_priority
from imagegen.queue.spend import DaySpend, total
from imagegen.settings import Settings, load_settings, require
from imagegen.target import Target

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, EXIT_SERVICE, EXIT_LIMIT = 0, 1, 2, 3, 4
# `check`, `generate` and `serve` import their modules when they run: those load the S3 client (boto) and the
# web server, which every other command would otherwise spend a third of its start-up importing.


def fail(message: str, code: int) -> NoReturn:
    click.echo(f"imagegen: {message}", err=True)
    sys.exit(code)


def _settings(ctx: click.Context) -> Settings:
    settings: Settings | None = ctx.obj.get("settings")
    if settings is None:
        chosen: tuple[str, ...] = ctx.obj["env_files"]
        try:
            settings = load_settings(chosen or ".env", must_exist=bool(chosen))
        except ConfigError as exc:
            fail(str(exc), EXIT_USAGE)
        setup_logging("ERROR", settings.secrets())
        ctx.obj["settings"] = settings
    return settings


def run(ctx: click.Context, work: Callable[[Settings], Coroutine[Any, Any, int]]) -> NoReturn:
    """Run one command's coroutine; expected failures become one line and an exit code."""
    settings = _settings(ctx)
    try:
        code = asyncio.run(work(settings))
    except ConfigError as exc:
        fail(str(exc), EXIT_USAGE)
    except DailyLimitReached as exc:
        fail(f"{exc}; no call made", EXIT_LIMIT)
    except ImagegenError as exc:
        fail(str(exc), EXIT_SERVICE)
    sys.exit(code)


def announce_target(settings: Settings, *, records: bool = True) -> None:
    """The first line of a command's text output: which Redis, queue (and collection) it reads."""
    click.echo(f"target: {Target.of(settings, records=records).describe()}")


def target_json(control: Control, *, records: bool = True) -> dict[str, str]:
    """The same for `--json` output, as its `target` field."""
    return Target.of(control.settings, records=records).to_json()


def with_control(
    ctx: click.Context,
    action: Callable[[Control], Awaitable[int]],
    *,
    as_json: bool,
    needs_pocketbase: bool = True,
    reads_records: bool | None = None,
) -> NoReturn:
    """Run `action` on an open Control, the target said first (in text output; `--json` has it as a field)."""

    async def work(settings: Settings) -> int:
        if needs_pocketbase:
            require(settings, "pocketbase_email", "pocketbase_password")
        if not as_json:
            announce_target(settings, records=needs_pocketbase if reads_records is None else reads_records)
        async with open_control(settings) as control:
            return await action(control)

    run(ctx, work)


def _report_line(report: EnqueueReport) -> str:
    detail = f": {report.detail}" if report.detail else ""
    return f"{report.prompt_id}  {report.outcome.value}{detail}"


async def _emit_reports(
    control: Control,
    pages: AsyncIterator[list[EnqueueReport]],
    as_json: bool,
    *,
    show_each: bool = True,
    progress: bool = False,
) -> int:
    """Print reports as they come, a page at a time, then the counts; nothing is held but the counts.

    `--json` prints one document, `{"target": {...}, "results": [...], "counts": {...}}`, written as the pages
    arrive."""
    tally = EnqueueTally()
    meter = Progress("records", enabled=progress and not as_json)
    # Written once there is something to say, so a run that fails at once prints only its error.
    opening = '{"target": ' + json.dumps(target_json(control), ensure_ascii=False) + ', "results": ['
    async for page in pages:
        tally.add(page)
        if as_json and page:
            click.echo(
                opening + ", ".join(json.dumps(EnqueueResultAnswer.of(r).to_json(), ensure_ascii=False) for r in page),
                nl=False,
            )
            opening = ", "
        elif show_each and page and not as_json:
            meter.clear()
            click.echo("\n".join(_report_line(r) for r in page))
        meter.update(tally.total)
    meter.clear()
    if as_json:
        started = opening == ", "
        click.echo(("" if started else opening) + '], "counts": ' + json.dumps(tally.counts, ensure_ascii=False) + "}")
    else:
        click.echo(tally.summary())
    return EXIT_PARTIAL if tally.any_bad else EXIT_OK


@click.group()
@click.option(
    "--env-file",
    "env_files",
    multiple=True,
    help="Settings file (default .env if present); repeat to read several, a later one winning. "
    "The environment wins over every file.",
)
@click.pass_context
def cli(ctx: click.Context, env_files: tuple[str, ...]) -> None:
    """Turn PocketBase prompt records into hosted images through the jimeng API."""
    ctx.ensure_object(dict)
    ctx.obj["env_files"] = env_files


@cli.command()
@click.argument("prompt_ids", nargs=-1, required=True)
@click.option("--force", is_flag=True, help="Run again even when the record is already done or failed.")
@click.option(
    "--priority",
    "priority_given",
    metavar="N",
    help="Priority from -1000 to 1000, higher runs first (default: each record's priority field, else 0).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def add(
    ctx: click.Context, prompt_ids: tuple[str, ...], force: bool, priority_given: str | None, as_json: bool
) -> None:
    """Queue the given prompt records (ids are 15 characters of a-z0-9)."""
    priority = None
    if priority_given is not None:
        try:
            if not priority_given.strip():  # a record's empty field means 0; an empty option means a mistake
                raise ValueError(PRIORITY_RULE)
            priority = check_priority(priority_given)
        except ValueError as exc:
            fail(f"invalid --priority {priority_given!r}: {exc}", EXIT_USAGE)

    async def action(control: Control) -> int:
        async def reports() -> AsyncIterator[list[EnqueueReport]]:
            for prompt_id in prompt_ids:
                yield [await control.enqueue(prompt_id, force=force, priority=priority)]

        return await _emit_reports(control, reports(), as_json)

    with_control(ctx, action, as_json=as_json)


def _bulk_options(command: Callable[..., None]) -> Callable[..., None]:
    """The options `add-pending` and `retry-failed` share."""
    for option in (
        click.option("--json", "as_json", is_flag=True, help="Machine-readable output."),
        click.option("--each", "show_each", is_flag=True, help="Print one line per record, not only the counts."),
        click.option("--dry-run", is_flag=True, help="Only say what would be queued; change nothing."),
    ):
        command = option(command)
    return command


@cli.command("add-pending")
@_bulk_options
@click.pass_context
def add_pending(ctx: click.Context, as_json: bool, show_each: bool, dry_run: bool) -> None:
    """Queue every record that has no image yet and has not failed."""

    async def action(control: Control) -> int:
        pages = control.enqueue_pending(dry_run=dry_run)
        return await _emit_reports(control, pages, as_json, show_each=show_each, progress=True)

    with_control(ctx, action, as_json=as_json)


@cli.command("retry-failed")
@_bulk_options
@click.pass_context
def retry_failed(ctx: click.Context, as_json: bool, show_each: bool, dry_run: bool) -> None:
    """Queue every failed record again, each a new run with all its attempts."""

    async def action(control: Control) -> int:
        pages = control.retry_failed(dry_run=dry_run)
        return await _emit_reports(control, pages, as_json, show_each=show_each, progress=True)

    with_control(ctx, action, as_json=as_json)


def _format_report(report: JobReport) -> str:
    data: dict[str, Any] = TaskAnswer.of(report).to_json()
    lines = [
        f"id:        {report.prompt_id}",
        f"state:     {report.state.value}",
        f"tries:     {report.tries}",
    ]
    for label, key in (
        ("enqueued:", "enqueued_at"),
        ("started:", "started_at"),
        ("finished:", "finished_at"),
        ("next try:", "scheduled_for"),
    ):
        if data[key]:
            lines.append(f"{label:<10} {data[key]}")
    if report.priority is not None:
        lines.append(f"priority:  {report.priority}")
    if data["duration_seconds"] is not None:
        lines.append(f"duration:  {data['duration_seconds']:.1f}s")
    if report.stage is not None:
        lines.append(f"stage:     {data['stage']} since {data['stage_since']}")
        spent = ", ".join(f"{t['stage']} {t['seconds']:.1f}s" for t in data["stages"])
        if spent:
            lines.append(f"timings:   {spent}")
    if report.error:
        lines.append(f"error:     {report.error}")
    if report.record_unavailable:
        lines.append(f"record:    unknown ({report.record_unavailable})")
    elif report.record_status is None:
        lines.append("record:    not found in PocketBase")
    else:
        lines.append(f"record:    {report.record_status or 'pending'}")
        lines.append(f"prompt:    {report.prompt}")
        for url in report.images or ([report.image_url] if report.image_url else []):
            lines.append(f"image:     {url}")
    return "\n".join(lines)


@cli.command()
@click.argument("prompt_id")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def inspect(ctx: click.Context, prompt_id: str, as_json: bool) -> None:
    """Show a prompt's job state, tries, timings, last error and image URLs."""

    async def action(control: Control) -> int:
        report = await control.inspect(prompt_id)
        document = {**TaskAnswer.of(report).to_json(), "target": target_json(control)}
        click.echo(json.dumps(document, ensure_ascii=False) if as_json else _format_report(report))
        if report.record_unavailable:
            click.echo(f"imagegen: the record could not be read: {report.record_unavailable}", err=True)
            return EXIT_SERVICE
        return EXIT_OK

    try:
        from imagegen.models import validate_prompt_id

        validate_prompt_id(prompt_id)
    except ImagegenError as exc:
        fail(str(exc), EXIT_USAGE)
    with_control(ctx, action, as_json=as_json)


@cli.command()
@click.option("--reason", default="paused by an operator", show_default=True, help="Why; shown by `status`.")
@click.pass_context
def pause(ctx: click.Context, reason: str) -> None:
    """Pause the queue for every worker: no new generation starts; jobs in flight finish."""

    async def action(control: Control) -> int:
        info = await control.pause(reason)
        click.echo(f"queue paused: {info.reason}")
        return EXIT_OK

    with_control(ctx, action, as_json=False, needs_pocketbase=False)


@cli.command()
@click.pass_context
def resume(ctx: click.Context) -> None:
    """Resume a paused queue (and reset the consecutive-failure count)."""

    async def action(control: Control) -> int:
        lifted = await control.resume()
        click.echo(f"queue resumed (was paused: {lifted.reason})" if lifted else "queue was not paused")
        return EXIT_OK

    with_control(ctx, action, as_json=False, needs_pocketbase=False)


def _format_status(report: StatusReport, providers: list[str]) -> str:
    data = QueueAnswer.of(report).to_json()
    records = data["records"]
    lines = [
        "jobs:      " + ", ".join(f"{n} {name.replace('_', ' ')}" for name, n in data["jobs"].items()),
        "records:   "
        + (
            ", ".join(f"{n} {name}" for name, n in records.items())
            + f" (counted {data['records_age_seconds']:.0f} s ago)"
            if records
            else f"unknown ({report.records_error})"
        ),
    ]
    paused = data["paused"]
    lines.append(
        f"queue:     paused since {paused['since']} ({paused['source']}): {paused['reason']}"
        if paused
        else "queue:     running"
    )
    for outage in data["outages"]:
        lines.append(
            f"outage:    {outage['service']} down since {outage['since']} "
            f"({outage['workers']} worker(s) waiting): {outage['error']}"
        )
    lines.append(f"failures:  {report.consecutive_failures} in a row (pause at {report.max_failed})")
    lines += _spend_today(data["spend"], providers)
    lines.append("accounts:  " + accounts_summary(report.accounts))
    if len(report.accounts) > 1 or any(health.state is not AccountState.HEALTHY for health in report.accounts):
        lines += [f"  {line}" for line in account_lines(report.accounts)]
    lines.append(f"workers:   {len(report.workers)} live")
    if not report.workers and report.last_worker_seen is not None:
        lines[-1] += f" (the last one seen {data['last_worker_seen']})"
    lines += [f"warning:   {warning}" for warning in data["warnings"]]
    for worker in report.workers:
        stopping = ", stopping" if worker.stopping else ""
        phases = Counter(job.phase for job in worker.jobs if job.phase != "waiting")
        detail = f" ({', '.join(f'{n} {phase}' for phase, n in sorted(phases.items()))})" if phases else ""
        lines.append(
            f"  {worker.id}  running {len(worker.running)}{detail}, "
            f"waiting {len(worker.waiting)}, done {worker.jobs_done}{stopping}"
        )
    return "\n".join(lines)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Counts by state, whether the queue is paused (why, since when), failure streak, live workers."""

    async def action(control: Control) -> int:
        try:
            require(control.settings, "pocketbase_email", "pocketbase_password")
        except ConfigError as exc:
            report = await control.status(records=False)
            report.records_error, code = str(exc), EXIT_USAGE
        else:
            report = await control.status()
            code = EXIT_SERVICE if report.records_error else EXIT_OK
        document = {**QueueAnswer.of(report).to_json(), "target": target_json(control)}
        shown = _format_status(report, control.settings.providers())
        click.echo(json.dumps(document, ensure_ascii=False) if as_json else shown)
        if report.records_error:
            click.echo(f"imagegen: record counts unavailable: {report.records_error}", err=True)
        return code

    with_control(ctx, action, as_json=as_json, needs_pocketbase=False, reads_records=True)


SPEND_COLUMNS = ("calls", "images", "moderated", "failed", "reserved")


def _format_spend(days: list[DaySpend], sums: dict[str, Any], limits: dict[str, int], zone: str) -> str:
    """One row per day and its total, and under each the providers that had calls, and their accounts."""
    header = f"{'day':<26}{'calls':>7}{'images':>8}{'moderated':>11}{'failed':>8}{'reserved':>10}"

    def row(label: str, counts: dict[str, Any]) -> str:
        return (
            f"{label:<26}{counts['calls']:>7}{counts['images']:>8}{counts['moderated']:>11}"
            f"{counts['failed']:>8}{counts['reserved']:>10}"
        )

    lines = [header]
    for day in days:
        lines.append(row(day.day.isoformat(), day.to_json()))
        for provider in day.providers:
            if provider.calls or provider.reserved:
                lines.append(row(f"  {provider.provider}", provider.counts_json()))
                lines += [row(f"    {_spend_account(a.account)}", a.counts_json()) for a in provider.accounts]
    lines.append(row("total", sums))
    lines += [row(f"  {name}", counts) for name, counts in sums["providers"].items() if counts["calls"]]
    named = ", ".join(
        f"{name.upper()}_DAILY_LIMIT {limit} calls a day" if limit else f"no {name.upper()}_DAILY_LIMIT"
        for name, limit in limits.items()
    )
    lines.append(f"days in {zone}; {named}")
    return "\n".join(lines)


def _spend_account(fingerprint: str | None) -> str:
    """An account of the spend counts: its fingerprint, or what calls counted without one were."""
    return fingerprint or "(no account recorded)"


def _spend_today(spend: dict[str, Any], configured: list[str]) -> list[str]:
    """status's spend lines: each provider in use or with calls today against its limit, then its accounts."""
    lines = []
    for provider in spend["providers"]:
        name = provider["provider"]
        if name not in configured and not provider["calls"]:
            continue
        limit = (
            f"of {provider['limit']} a day ({name.upper()}_DAILY_LIMIT)"
            if provider["limit"]
            else f"(no {name.upper()}_DAILY_LIMIT)"
        )
        reserved = f", {provider['reserved']} in flight or unsettled" if provider["reserved"] else ""
        lines.append(
            f"spend:     {provider['calls']} {name} calls today ({spend['day']} {spend['timezone']}) {limit}: "
            f"{provider['images']} images, {provider['moderated']} moderated, {provider['failed']} failed{reserved}"
        )
        lines += [
            f"  {_spend_account(account['account'])}  {account['calls']} calls: {account['images']} images, "
            f"{account['moderated']} moderated, {account['failed']} failed"
            for account in provider["accounts"]
        ]
    return lines


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def accounts(ctx: click.Context, as_json: bool) -> None:
    """The accounts of every provider: each jimeng key's state, calls today, in flight and credits; Ark's key."""

    async def action(control: Control) -> int:
        found = await accounts_with_credits(control)
        if as_json:
            document = {
                **AccountsAnswer.of(found).to_json(),
                "target": target_json(control, records=False),
            }
            click.echo(json.dumps(document, ensure_ascii=False))
        else:
            click.echo(format_accounts(found))
        return EXIT_OK

    with_control(ctx, action, as_json=as_json, needs_pocketbase=False)


@cli.command()
@click.option("--days", default=7, show_default=True, type=click.IntRange(1, 400), help="How many days back.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def spend(ctx: click.Context, days: int, as_json: bool) -> None:
    """Paid calls per day by outcome (images, moderated, failed), provider and account, today first, and their
    total."""

    async def action(control: Control) -> int:
        found = await control.spend(days)
        sums = total(found)
        limits, zone = control.settings.daily_limits(), control.settings.jimeng_daily_limit_tz
        if as_json:
            document = {
                "timezone": zone,
                "limit": limits["jimeng"] or None,
                "limits": {name: limit or None for name, limit in limits.items()},
                "days": [d.to_json() for d in found],
                "total": sums,
                "target": target_json(control, records=False),
            }
            click.echo(json.dumps(document, ensure_ascii=False))
        else:
            click.echo(_format_spend(found, sums, limits, zone))
        return EXIT_OK

    with_control(ctx, action, as_json=as_json, needs_pocketbase=False)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def check(ctx: click.Context, as_json: bool) -> None:
    """Test each configured service; one line per service saying what is wrong."""

    from imagegen.ops.checks import check_services

    async def work(settings: Settings) -> int:
        target = Target.of(settings)
        if not as_json:
            announce_target(settings)
        checkup = await check_services(settings)
        warnings = settings.warnings()
        schema = checkup.collection
        problems = [p.line() for p in schema.problems] if schema is not None else []
        notes = schema.notes if schema is not None else []
        if as_json:
            services = [{"service": r.service, "ok": r.ok, "detail": r.detail} for r in checkup.services]
            collection = None if schema is None else {"problems": problems, "notes": notes}
            document = {
                "services": services,
                "collection": collection,
                "warnings": warnings,
                "target": target.to_json(),
            }
            click.echo(json.dumps(document, ensure_ascii=False))
        else:
            for r in checkup.services:
                click.echo(f"{r.service:<11} {'ok  ' if r.ok else 'FAIL'} {r.detail}")
            if schema is not None and not problems:
                click.echo(f"{'collection':<11} ok   every field imagegen writes takes what it writes")
            for problem in problems:
                click.echo(f"{'collection':<11} FAIL {problem}")
            for note in notes:
                click.echo(f"note:       {note}")
            for warning in warnings:
                click.echo(f"warning:    {warning}")
        return EXIT_OK if checkup.ok else EXIT_SERVICE

    run(ctx, work)


@cli.command("setup-collection")
@click.option("--dry-run", is_flag=True, help="Only print what would change (the default off a terminal).")
@click.option("--yes", is_flag=True, help="Apply without asking.")
@click.pass_context
def setup_collection_command(ctx: click.Context, dry_run: bool, yes: bool) -> None:
    """Add the fields imagegen uses to the collection (and missing values to its status select); never
    removes, renames or retypes anything. Creates the collection when it isn't there."""
    dry_run = dry_run or (not yes and not sys.stdin.isatty())

    async def work(settings: Settings) -> int:
        require(settings, "pocketbase_email", "pocketbase_password")
        async with aiohttp.ClientSession() as http:
            pocketbase = PocketBaseClient(http, settings)
            plan = await setup_collection(pocketbase, FieldLayout.from_settings(settings), apply=False)
            if plan.empty:
                click.echo(f"collection {plan.collection} has every field imagegen uses; nothing to change")
                return EXIT_OK
            for change in plan.changes:
                click.echo(("would " if dry_run else "") + change)
            if dry_run:
                click.echo("dry run: nothing changed; run `imagegen setup-collection --yes` to apply")
                return EXIT_OK
            if not yes and not click.confirm(f"apply these changes to {plan.collection}?"):
                click.echo("nothing changed")
                return EXIT_PARTIAL
            await pocketbase.save_schema(plan.body(), create=plan.create)
            click.echo(f"collection {plan.collection}: {len(plan.changes)} change(s) made")
        return EXIT_OK

    run(ctx, work)


@cli.command()
@click.argument("prompt")
@click.option("--ratio", default="", metavar="R", help="Aspect ratio, e.g. 16:9 (default: JIMENG_RATIO).")
@click.option("--resolution", default="", metavar="X", help="1k, 2k or 4k (default: JIMENG_RESOLUTION).")
@click.option("--model", default="", metavar="M", help="Model name, e.g. jimeng-4.5 (default: JIMENG_MODEL).")
@click.option("--negative", default="", metavar="TEXT", help="Negative prompt: what the images should not show.")
@click.option("--upload", is_flag=True, help="Store the images in the bucket (TOS_*) and print their public URLs.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def generate(
    ctx: click.Context,
    prompt: str,
    ratio: str,
    resolution: str,
    model: str,
    negative: str,
    upload: bool,
    as_json: bool,
) -> None:
    """Generate images for PROMPT with exactly one paid jimeng call (no PocketBase, no queue) and print their
    links, or with --upload their URLs in the bucket. The API's links expire within hours."""
    from imagegen.ops.oneoff import OneOffRequest, generate_once

    try:
        given = {"model": model, "ratio": ratio, "resolution": resolution}
        request = OneOffRequest.build(_settings(ctx), prompt, negative, given, upload=upload)
    except ImagegenError as exc:
        fail(str(exc), EXIT_USAGE)

    async def work(settings: Settings) -> int:
        result = await generate_once(settings, request, lambda line: click.echo(f"imagegen: {line}", err=True))
        document = {**result.to_json(), "target": Target.of(settings, records=False).to_json()}
        click.echo(json.dumps(document, ensure_ascii=False) if as_json else "\n".join(result.urls))
        return EXIT_OK

    run(ctx, work)


@cli.command()
@click.option("--host", help="Address to listen on (default: WEB_HOST, 127.0.0.1).")
@click.option("--port", type=click.IntRange(1, 65535), help="Port to listen on (default: WEB_PORT, 8300).")
@click.pass_context
def serve(ctx: click.Context, host: str | None, port: int | None) -> None:
    """Serve the HTTP API under /api/ and the dashboard at / (beyond loopback only with API_TOKEN set)."""
    from imagegen.web import serve as serve_web

    async def work(settings: Settings) -> int:
        require(settings, "pocketbase_email", "pocketbase_password")
        setup_logging(settings.log_level, settings.secrets())
        await serve_web(settings, host or settings.web_host, port or settings.web_port)
        return EXIT_OK

    run(ctx, work)


@cli.command()
@click.option("--check", is_flag=True, help="Exit 0 when a live worker of the queue reported lately, else 1.")
@click.option("--burst", is_flag=True, help="Stop once the queue is empty.")
@click.pass_context
def worker(ctx: click.Context, check: bool, burst: bool) -> None:
    """Run a worker process: take jobs off the queue until SIGTERM or SIGINT (supervisord runs several)."""
    from imagegen.worker.arqworker import check_worker, run_worker

    settings = _settings(ctx)
    sys.exit(check_worker(settings) if check else run_worker(settings, burst=burst))


def main() -> None:
    cli(obj={})

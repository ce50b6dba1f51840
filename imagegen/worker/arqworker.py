"""The one place imagegen meets arq's internals: `ImagegenWorker`, arq's Worker with what we change.

arq runs the jobs: it reads the queue, marks a job in progress, retries, keeps results and the health key.
imagegen changes three things about how, each an override in this class and nowhere else:

- **picking**: arq sleeps `poll_delay` between reads of the queue and re-reads its head each time. Here the
  worker polls the moment it is woken (jobs were queued, one of its jobs ended or lent its slot: `intake`),
  else every QUEUE_POLL_INTERVAL; and it starts only the due jobs nobody runs, highest priority first, that
  `Intake.claim` found and marked in progress in one step, all at once rather than arq's one check and start
  after the other (`_poll_iteration`, `start_jobs`, `_release_sem_dec_counter_on_complete`);
- **job slots**: a job whose paid call returned lends its job slot back while it stores its images
  (`slots`): the worker's `max_jobs` goes up by one for it and down when it ends, and arq's semaphore is made
  wide enough that `max_jobs` alone limits (`lend_job_slot`, `return_job_slot`);
- **stopping**: on SIGTERM or SIGINT the jobs that have not reached their paid call go back to the queue at
  once (`Runs.stop`), before arq's own handling waits up to WORKER_SHUTDOWN_GRACE seconds for the rest
  (`handle_sig`, `handle_sig_wait_for_completion`).

Every arq name this relies on is listed below; `check_arq()` compares them with the installed arq when a
worker is built (and a test does in CI), and a mismatch stops the worker with one line naming arq's
version: never a silent fallback to arq's own behaviour.

**Adoption point.** `imagegen worker` builds an ImagegenWorker itself. `arq imagegen.WorkerSettings` goes
through arq's command line, which would build arq's plain Worker from a settings mapping; `WorkerSettings`
is that mapping, and the moment arq's command reads it, it runs `imagegen worker` instead (with `--check`:
`imagegen worker --check`; `--burst` carries over) and exits with its code. Read anywhere else it refuses
with one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import re
import signal
from typing import Any, NoReturn

import arq
import arq.cli
import click
from arq.constants import health_check_key_suffix, in_progress_key_prefix
from arq.worker import Worker
from loguru import logger
from typing_extensions import override

from imagegen.errors import ConfigError
from imagegen.queue.priority import BAND
from imagegen.queue.spend import Clock
from imagegen.settings import Settings, load_settings

from .process import Started, prepare_worker, startup, startup_failure, worker_health, worker_options

# arq acquires its semaphore once per job; with it this wide, `max_jobs` is the only limit.
_UNBOUNDED = 1 << 30

# What this module relies on in arq: the methods overridden, with their parameters; the attributes read or
# written on a built worker; the arguments given to its constructor; the constants of its Redis keys.
OVERRIDDEN = {
    "_poll_iteration": ("self",),
    "start_jobs": ("self", "job_ids"),
    "_release_sem_dec_counter_on_complete": ("self",),
    "handle_sig": ("self", "signum"),
    "handle_sig_wait_for_completion": ("self", "signum"),
}
# arq's methods called as arq itself calls them, with their parameters.
CALLED = {"run_job": ("self", "job_id", "score")}
ATTRIBUTES = (
    "max_jobs",
    "job_counter",
    "sem",
    "ctx",
    "allow_pick_jobs",
    "tasks",
    "job_tasks",
    "main_task",
    "poll_delay_s",
    "in_progress_timeout_s",
    "loop",
)
ARGUMENTS = (
    "functions",
    "queue_name",
    "redis_settings",
    "on_startup",
    "on_shutdown",
    "max_jobs",
    "job_timeout",
    "keep_result",
    "ctx",
    "health_check_interval",
    "job_completion_wait",
    "poll_delay",
    "queue_read_limit",
    "burst",
    "handle_signals",
)
CONSTANTS = {"in_progress_key_prefix": in_progress_key_prefix, "health_check_key_suffix": health_check_key_suffix}
EXPECTED_CONSTANTS = {"in_progress_key_prefix": "arq:in-progress:", "health_check_key_suffix": ":health-check"}
# arq's log line when a job starts (`Worker.run_job`), which `ShiftedDelayFilter` corrects.
START_LINE = "%6.2fs → %s(%s)%s"


def check_arq() -> None:
    """ConfigError naming arq's version when the installed arq is not shaped as this class expects."""
    problems = []
    for name, parameters in {**OVERRIDDEN, **CALLED}.items():
        method = getattr(Worker, name, None)
        if method is None:
            problems.append(f"Worker.{name} is gone")
        elif tuple(inspect.signature(method).parameters) != parameters:
            problems.append(f"Worker.{name}{tuple(inspect.signature(method).parameters)}")
    missing = set(ARGUMENTS) - set(inspect.signature(Worker.__init__).parameters)
    if missing:
        problems.append(f"Worker() takes no {', '.join(sorted(missing))}")
    changed = [name for name, value in EXPECTED_CONSTANTS.items() if CONSTANTS[name] != value]
    problems += [f"{name} is {CONSTANTS[name]!r}" for name in changed]
    if problems:
        raise ConfigError(
            f"arq {arq.VERSION} is not the arq imagegen's worker was built on ({'; '.join(problems)}); "
            "install the arq version pyproject.toml pins"
        )


class ShiftedDelayFilter(logging.Filter):
    """arq's job start line adds `delayed=<now - score>` when that is over 1.2 s; with shifted scores
    (`priority`) it is the shift itself, so the line gets the real delay (since the job was due) or none."""

    _DELAYED = re.compile(r" delayed=(\d+(?:\.\d+)?)s")

    def filter(self, record: logging.LogRecord) -> bool:
        args: Any = record.args
        if record.msg != START_LINE or not isinstance(args, tuple) or len(args) != 4:
            return True
        extra = str(args[3])
        found = self._DELAYED.search(extra)
        if found:
            seconds = float(found[1]) % (BAND / 1000)
            shown = f" delayed={seconds:0.2f}s" if seconds > 1.2 else ""
            record.args = (*args[:3], extra[: found.start()] + shown + extra[found.end() :])
        return True


_START_FILTER = ShiftedDelayFilter()


class ImagegenWorker(Worker):
    """arq's Worker for imagegen's settings, picking, job slots and stop (see the module's text)."""

    def __init__(
        self, settings: Settings, *, clock: Clock | None = None, burst: bool = False, handle_signals: bool = True
    ) -> None:
        check_arq()
        self._started: Started | None = None
        self._grace = settings.worker_shutdown_grace
        options = worker_options(settings, clock)
        super().__init__(
            **options,
            on_startup=self._on_startup,
            # The wait between polls is `Intake.wait`; arq's own read only tells whether anything is due.
            poll_delay=0,
            queue_read_limit=1,
            burst=burst,
            handle_signals=handle_signals,
        )
        absent = [name for name in ATTRIBUTES if not hasattr(self, name)]
        if absent:
            raise ConfigError(
                f"arq {arq.VERSION} builds workers without {', '.join(absent)}; "
                "install the arq version pyproject.toml pins"
            )
        self.sem = asyncio.BoundedSemaphore(_UNBOUNDED)
        logging.getLogger("arq.worker").addFilter(_START_FILTER)

    async def _on_startup(self, ctx: dict[str, Any]) -> None:
        self._started = await startup(ctx)
        self._started.slots.attach(self)

    @property
    def started(self) -> Started:
        if self._started is None:
            raise RuntimeError("the worker's start-up has not run")
        return self._started

    def lend_job_slot(self) -> None:
        self.max_jobs += 1
        self.started.intake.wake()

    def return_job_slot(self) -> None:
        self.max_jobs -= 1

    @override
    async def _poll_iteration(self) -> None:
        intake = self.started.intake
        intake.clear()
        await super()._poll_iteration()
        await intake.wait()

    @override
    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """`job_ids` is arq's read of the queue's head (one id: whether anything is due); the jobs started
        are the due ones nobody runs, as many as there is room for, claimed in one step and started at once
        with arq's own bookkeeping (its `run_job` runs each, as from arq's `start_jobs`)."""
        room = self.max_jobs - self.job_counter
        if not job_ids or room <= 0:
            return
        claimed = await self.started.intake.claim(room, int(self.in_progress_timeout_s * 1000))
        for job_id_b, score in claimed:
            job_id = job_id_b.decode()
            await self.sem.acquire()  # never waits: `max_jobs` alone limits (see `_UNBOUNDED`)
            self.job_counter += 1
            task = self.loop.create_task(self.run_job(job_id, score))
            task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
            self.tasks[job_id] = task

    @override
    def _release_sem_dec_counter_on_complete(self) -> None:
        super()._release_sem_dec_counter_on_complete()
        if self._started is not None:
            self._started.intake.wake()

    @override
    def handle_sig(self, signum: signal.Signals) -> None:
        self._send_back(signum)
        super().handle_sig(signum)

    @override
    def handle_sig_wait_for_completion(self, signum: signal.Signals) -> None:
        self._send_back(signum)
        super().handle_sig_wait_for_completion(signum)

    def _send_back(self, signum: signal.Signals) -> None:
        """On a real stop (arq also calls `handle_sig` with SIGUSR1 when it closes), send the jobs that have
        not reached their paid call back to the queue at once."""
        if signum not in (signal.SIGTERM, signal.SIGINT) or self._started is None:
            return
        sent_back, running = self._started.runs.stop()
        logger.info(
            "stopping on {}: {} jobs back to the queue at once, {} finishing (paid call or storing, at most {} s)",
            signal.Signals(signum).name,
            sent_back,
            running,
            self._grace,
        )

    async def stop_now(self, settle: float = 10.0) -> None:
        """Stop a worker this process runs itself (`async_run` in a task) at once, as a stop past its grace
        would, and close it: no job is picked any more; the jobs arq has just picked first reach the job
        function (a cancel inside arq's own start of a job would leave its hour-long in-progress mark behind),
        for at most `settle` seconds; then every running job is cancelled, each going back to the queue."""
        self.allow_pick_jobs = False
        loop = asyncio.get_running_loop()
        end = loop.time() + settle
        while loop.time() < end:
            picked = [task for job_id, task in self.tasks.items() if not task.done() and job_id not in self.job_tasks]
            if not picked:
                break
            await asyncio.wait(picked, timeout=0.02)
        self.handle_sig(signal.SIGUSR1)
        # arq's close() gives up (skipping the shutdown hook) when a job task it gathers ended cancelled.
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        self.tasks.clear()
        if self.main_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self.main_task
        await self.close()


def run_worker(settings: Settings, *, burst: bool = False) -> int:
    """Check, build and run a worker process until it stops; its exit code."""
    prepare_worker(settings)
    try:
        worker = ImagegenWorker(settings, burst=burst)
    except ConfigError as exc:
        startup_failure(str(exc))
    worker.run()
    return 0


def check_worker(settings: Settings) -> int:
    """`--check`: 0 when a live worker of the queue reported in the last interval, else 1; one line."""
    alive, line = worker_health(settings)
    click.echo(f"imagegen worker: {line}", err=not alive)
    return 0 if alive else 1


class ArqCommandSettings(dict[str, Any]):
    """`imagegen.WorkerSettings`: what arq's command line reads as its worker settings (the adoption point)."""

    def _take_over(self) -> NoReturn:
        context = click.get_current_context(silent=True)
        if context is None or context.command is not arq.cli.cli:
            startup_failure(
                "imagegen.WorkerSettings is for arq's command line (`arq imagegen.WorkerSettings`); "
                "in code, run imagegen.worker.arqworker.ImagegenWorker(settings)"
            )
        if context.params.get("watch"):
            startup_failure("arq --watch is not supported: restart `imagegen worker` after a change instead")
        try:
            settings = load_settings()
        except ConfigError as exc:
            startup_failure(str(exc))
        if context.params.get("check"):
            raise SystemExit(check_worker(settings))
        raise SystemExit(run_worker(settings, burst=bool(context.params.get("burst"))))

    def items(self) -> Any:
        self._take_over()

    def get(self, key: str, default: Any = None) -> Any:
        self._take_over()

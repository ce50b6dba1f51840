"""Figure 6, crash recovery: from SIGKILL of the worker in a job's paid call to the job running elsewhere.

Two imagegen workers with default settings: the first takes the job, whose generation call the fake holds
for minutes; once the second is ready the first is killed, and the time until the fake sees the job's second
call is the recovery time. The baseline is plain arq's: a killed job runs again only when its in-progress key
expires, job_timeout + 10 s after it started; that is read from the key's TTL at the kill instead of waited for.
"""

from __future__ import annotations

import time

from arq.constants import in_progress_key_prefix

from imagegen.ops.control import open_control
from imagegen.settings import Settings

from .baseline import READY
from .report import Figure, Row, Target
from .stack import BenchError, Stack, arq_pool, create_records, wait_for, worker_ready

RECOVERY_TARGET = 15.0
PROMPT = "recovery: a lighthouse keeper at night"


async def imagegen_recovery(stack: Stack) -> float:
    [record_id] = await create_records(stack, [PROMPT])
    sandbox = stack.jimeng.sandbox
    sandbox.script(PROMPT, ["slow:600", "ok"])  # the first call hangs, the rerun's answers at once
    first = stack.worker()
    second = None
    try:
        await worker_ready(first)
        async with open_control(stack.settings()) as control:
            await control.enqueue(record_id)
            await wait_for(lambda: sandbox.calls(PROMPT) == 1, 60, "the job's paid call")
            second = stack.worker()
            await worker_ready(second)
            killed_at = time.time()
            first.kill()
            await wait_for(lambda: len(sandbox.call_starts(PROMPT)) >= 2, 300, "the job to run again")
            recovered = sandbox.call_starts(PROMPT)[1] - killed_at

            async def done() -> bool:
                info = await control.job(record_id).result_info()
                return info is not None and info.success

            await wait_for(done, 60, "the rerun to finish")
    finally:
        first.stop()
        if second is not None:
            second.stop()
    return recovered


async def arq_recovery(stack: Stack, job_timeout: int) -> float:
    """Seconds until arq would run a killed worker's job again: its in-progress key's TTL at the kill."""
    queue = "bench:baseline"
    worker = stack.baseline_worker("--queue", queue, "--job-timeout", str(job_timeout))
    try:
        await worker.wait_for_output(READY)
        async with arq_pool(stack) as pool:
            job = await pool.enqueue_job("sleep_job", 600.0, _queue_name=queue)
            if job is None:
                raise BenchError("the baseline job was not queued")
            key = in_progress_key_prefix + job.job_id

            async def running() -> bool:
                return bool(await pool.exists(key))

            await wait_for(running, 30, "the baseline job to start")
            worker.kill()
            ttl_ms = int(await pool.pttl(key))
    finally:
        worker.stop()
    return ttl_ms / 1000


async def measure(stack: Stack, quick: bool, profile: bool) -> Figure:
    defaults = Settings(_env_file=None)
    recovered = await imagegen_recovery(stack)
    baseline = await arq_recovery(stack, defaults.queue_job_timeout)
    rows = [
        Row("crash recovery: SIGKILL to the job running again", "s", recovered, baseline, Target("<=", RECOVERY_TARGET))
    ]
    notes = [
        f"Two imagegen workers with default settings (WORKER_LEASE={defaults.worker_lease:g} s, "
        f"QUEUE_JOB_TIMEOUT={defaults.queue_job_timeout}); the job's generation call is held by the fake; the worker "
        "running it is SIGKILLed once the other is ready; recovery = the fake's second call for the prompt - the "
        "kill. The rerun then finishes the record.",
        f"Baseline, computed not waited for: a plain arq worker (job_timeout={defaults.queue_job_timeout}, as "
        "imagegen's) running a sleeping job is SIGKILLed and the TTL of the job's in-progress key read at once: "
        "arq runs the job again only when that key expires (job_timeout + 10 s after the start), plus up to one "
        "0.5 s poll.",
    ]
    return Figure("recovery", rows, notes)

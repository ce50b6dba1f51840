"""A record's own model, ratio and resolution: what reaches the API, and a bad value failing before any call."""

from __future__ import annotations

from typing import Any

import pytest

from imagegen.ops.control import open_control
from imagegen.settings import Settings

from .conftest import RecordFactory, Stack
from .test_pipeline import bucket_keys, enqueue, run_queue


def asked(stack: Stack, prompt: str) -> dict[str, Any]:
    """The one generation request the fake received for this prompt."""
    bodies = stack.jimeng.sandbox.received(prompt)
    assert len(bodies) == 1, bodies
    body: dict[str, Any] = bodies[0]
    return body


async def test_a_records_choices_reach_the_api_request(
    stack: Stack, settings: Settings, records: RecordFactory, pocketbase
):
    record = await records.create("a tall lighthouse", "blurry")
    await pocketbase.update_record(record.id, {"model": "jimeng-4.5", "ratio": "9:16", "resolution": "4K"})
    await enqueue(settings, record.id)
    await run_queue(settings)

    done = await pocketbase.get_record(record.id)
    assert done.status == "done", done.error
    assert len(done.images) == 4
    body = asked(stack, record.prompt)
    assert (body["model"], body["ratio"], body["resolution"]) == ("jimeng-4.5", "9:16", "4k")
    assert body["negative_prompt"] == "blurry"


async def test_empty_choices_use_the_settings(stack: Stack, records: RecordFactory, pocketbase):
    settings = stack.settings(jimeng_model="jimeng-3.1", jimeng_ratio="3:4", jimeng_resolution="1k")
    plain = await records.create("a plain record")
    ratio_only = await records.create("a record with its own ratio")
    await pocketbase.update_record(ratio_only.id, {"ratio": "21:9", "model": "  ", "resolution": ""})
    await enqueue(settings, plain.id, ratio_only.id)
    await run_queue(settings)

    for record in (plain, ratio_only):
        assert (await pocketbase.get_record(record.id)).status == "done"
    body = asked(stack, plain.prompt)
    assert (body["model"], body["ratio"], body["resolution"]) == ("jimeng-3.1", "3:4", "1k")
    assert "negative_prompt" not in body
    body = asked(stack, ratio_only.prompt)
    assert (body["model"], body["ratio"], body["resolution"]) == ("jimeng-3.1", "21:9", "1k")


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("ratio", "5:5", "which must be one of 1:1, 4:3, 3:4, 16:9, 9:16, 3:2, 2:3, 21:9"),
        ("resolution", "8k", "which must be one of 1k, 2k, 4k"),
        ("model", "jimeng 4.0; drop", "which must be a model name such as jimeng-4.0"),
    ],
)
async def test_an_invalid_choice_fails_the_record_at_once_without_a_call(
    stack: Stack, settings: Settings, records: RecordFactory, pocketbase, field, value, words
):
    record = await records.create("a record with a typo in its choices")
    await pocketbase.update_record(record.id, {field: value})
    await enqueue(settings, record.id)
    await run_queue(settings)

    failed = await pocketbase.get_record(record.id)
    assert failed.status == "failed"
    assert failed.error.startswith(f"record {record.id} has {field}={value!r}, {words}")
    assert f"JIMENG_{field.upper()}" in failed.error
    assert "\n" not in failed.error
    assert stack.jimeng.sandbox.received() == []
    assert await bucket_keys(settings) == []
    async with open_control(settings) as control:
        report = await control.inspect(record.id)
    assert report.tries == 1  # permanent: no attempt is retried
    assert report.error == failed.error


async def test_a_field_name_set_empty_is_not_read(stack: Stack, records: RecordFactory, pocketbase):
    # POCKETBASE_FIELD_RATIO= says the collection has no ratio field: whatever a field of that name holds is
    # not the record's choice, and JIMENG_RATIO applies.
    settings = stack.settings(pocketbase_field_ratio="", jimeng_ratio="4:3")
    record = await records.create("a collection without choices")
    await pocketbase.update_record(record.id, {"ratio": "not a ratio"})
    await enqueue(settings, record.id)
    await run_queue(settings)

    assert (await pocketbase.get_record(record.id)).status == "done"
    assert asked(stack, record.prompt)["ratio"] == "4:3"

"""The Ark client against the Ark fake over real HTTP: every answer of docs/ark-api.md is judged right."""

import io
import json
import socket
import time

import aiohttp
import pytest
from PIL import Image

from imagegen.choices import RATIOS, RESOLUTIONS, Choices
from imagegen.clients.ark import SIZES, ArkClient, ark_size, classify_error, parse_generation
from imagegen.clients.provider import ImageFailure, ImageLink, InlineImage, Provider
from imagegen.dev.ark_sandbox import ERRORS, ArkSandboxConfig, ArkSandboxThread
from imagegen.errors import ArkError, ConfigError, FailureKind
from imagegen.settings import Settings, load_settings

KEY = "ark-test-key-0d6b2f9c4a71e8"
DEFAULT_MODEL = "doubao-seedream-4-0-250828"
NEWER_MODEL = "doubao-seedream-4-5-251128"
TRANSIENT, PERMANENT, ACCOUNT = FailureKind.TRANSIENT, FailureKind.PERMANENT, FailureKind.ACCOUNT


@pytest.fixture(scope="module")
def fake():
    with ArkSandboxThread(ArkSandboxConfig(api_key=KEY)) as running:
        yield running


@pytest.fixture(autouse=True)
def clean_fake(fake):
    yield
    fake.sandbox.reset()


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as shared:
        yield shared


def settings_for(base_url: str, **values) -> Settings:
    values = {"ark_api_key": KEY, "ark_base_url": base_url, **values}
    return Settings(_env_file=None, **values)


def client_for(session, fake, **values) -> ArkClient:
    return ArkClient(session, settings_for(fake.base_url, **values))


def dimensions(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "JPEG"
        return image.size


async def test_a_url_answer_is_a_link_to_the_image_of_the_asked_size_for_24_hours(session, fake):
    client = client_for(session, fake)
    before = time.time()
    result = await client.generate("a lighthouse at dawn", "", Choices("jimeng-4.0", "16:9", "2k"))
    after = time.time()

    assert result.provider == "ark"
    assert result.model == DEFAULT_MODEL
    assert result.failures == ()
    assert result.billed_images == 1
    (link,) = result.images
    assert isinstance(link, ImageLink)
    assert before + 24 * 3600 <= link.expires_at <= after + 24 * 3600
    assert link.size == "2848x1600"
    async with session.get(link.url) as response:
        assert response.status == 200
        served = await response.read()
    assert served == fake.sandbox.served_images("a lighthouse at dawn")[0]
    assert dimensions(served) == (2848, 1600)

    fake.sandbox.expire_links()
    async with session.get(link.url) as response:
        assert response.status == 403


async def test_a_b64_json_answer_is_decoded_only_when_asked(session, fake):
    client = client_for(session, fake, ark_response_format="b64_json")
    result = await client.generate("a red fox in snow", "", Choices("jimeng-4.0", "3:4", "2k"))

    (inline,) = result.images
    assert isinstance(inline, InlineImage)
    assert fake.sandbox.received("a red fox in snow")[0]["response_format"] == "b64_json"
    data = inline.decode()
    assert data == fake.sandbox.served_images("a red fox in snow")[0]
    assert dimensions(data) == (1728, 2304)
    with pytest.raises(ValueError, match="not base64"):
        InlineImage("not base64 at all!").decode()


async def test_a_group_call_delivers_every_image_the_model_made(session, fake):
    client = client_for(session, fake, ark_max_images=4)
    prompt = "three views of one teapot [[ark:images=3]]"
    result = await client.generate(prompt, "", Choices("jimeng-4.0", "1:1", "2k"))

    assert len(result.images) == 3
    assert result.billed_images == 3
    assert fake.sandbox.images_made(prompt) == 3
    assert fake.sandbox.calls(prompt) == 1
    sent = fake.sandbox.received(prompt)[0]
    assert sent["sequential_image_generation"] == "auto"
    assert sent["sequential_image_generation_options"] == {"max_images": 4}
    downloaded = []
    for link in result.images:
        assert isinstance(link, ImageLink)
        async with session.get(link.url) as response:
            downloaded.append(await response.read())
    assert downloaded == fake.sandbox.served_images(prompt)
    assert len(set(downloaded)) == 3


async def test_one_image_per_call_disables_group_mode(session, fake):
    await client_for(session, fake).generate("a single pear", "", Choices("jimeng-4.0", "1:1", "2k"))
    sent = fake.sandbox.received("a single pear")[0]
    assert sent["sequential_image_generation"] == "disabled"
    assert "sequential_image_generation_options" not in sent


async def test_a_partial_success_delivers_the_rest_and_names_the_blocked_images(session, fake):
    client = client_for(session, fake, ark_max_images=3)
    prompt = "a crowd at a market [[ark:blocked=1]]"
    result = await client.generate(prompt, "", Choices("jimeng-4.0", "1:1", "2k"))

    assert len(result.images) == 2
    assert result.partial
    assert result.failures == (
        ImageFailure(1, "OutputImageSensitiveContentDetected", ERRORS["OutputImageSensitiveContentDetected"][1]),
    )
    assert result.billed_images == 2 == fake.sandbox.images_made(prompt)


async def test_a_call_whose_every_image_was_blocked_is_a_moderation_failure(session, fake):
    with pytest.raises(ArkError) as caught:
        await client_for(session, fake).generate("[[ark:blocked=0]] a crowd", "", Choices("jimeng-4.0", "1:1", "2k"))
    error = caught.value
    assert (error.kind, error.moderated, error.paid) == (PERMANENT, True, False)
    assert "blocked by content moderation" in str(error)


# Every row of ark-api.md's error table: its class and the plain words of its message.
ROWS = {
    "MissingParameter": (PERMANENT, "lacks a required parameter"),
    "InvalidParameter": (PERMANENT, "refused a parameter"),
    "InvalidParameter.size": (PERMANENT, "refused a parameter"),
    "InputTextSensitiveContentDetected": (PERMANENT, "prompt was blocked by content moderation"),
    "InputTextSensitiveContentDetected.PolicyViolation": (PERMANENT, "prompt was blocked by content moderation"),
    "InputImageSensitiveContentDetected": (PERMANENT, "reference image was blocked"),
    "OutputImageSensitiveContentDetected": (PERMANENT, "generated image was blocked"),
    "OutputImageSensitiveContentDetected.PrivacyInformation": (PERMANENT, "generated image was blocked"),
    "AuthenticationError": (ACCOUNT, "key was refused; check ARK_API_KEY"),
    "AccountOverdueError": (ACCOUNT, "account is overdue"),
    "AccessDenied": (ACCOUNT, f"may not use model {DEFAULT_MODEL}"),
    "OperationDenied.ServiceOverdue": (ACCOUNT, "overdue balance"),
    "ModelNotOpen": (ACCOUNT, f"model {DEFAULT_MODEL} is not activated"),
    "InvalidEndpointOrModel.NotFound": (ACCOUNT, f"no model or endpoint {DEFAULT_MODEL}; check ARK_MODEL"),
    "InvalidEndpointOrModel.ModelIDAccessDisabled": (ACCOUNT, f"access to model {DEFAULT_MODEL} is disabled"),
    "ModelAccountIpmRateLimitExceeded": (TRANSIENT, "images per minute"),
    "ModelAccountRpmRateLimitExceeded": (TRANSIENT, "requests per minute"),
    "RateLimitExceeded.EndpointRPMExceeded": (TRANSIENT, "endpoint's requests per minute"),
    "AccountRateLimitExceeded": (TRANSIENT, "rate limit"),
    "RequestBurstTooFast": (TRANSIENT, "rose too fast"),
    "ServerOverloaded": (TRANSIENT, "overloaded"),
    "InternalServiceError": (TRANSIENT, "failed internally"),
    "QuotaExceeded": (ACCOUNT, "quota is used up"),
    "SetLimitExceeded": (ACCOUNT, "spending limit"),
}


def test_the_fake_plays_every_row_of_the_error_table():
    assert set(ROWS) == set(ERRORS)


@pytest.mark.parametrize("code", sorted(ROWS))
async def test_each_error_row_is_classified_with_plain_words(session, fake, code):
    kind, words = ROWS[code]
    with pytest.raises(ArkError) as caught:
        await client_for(session, fake).generate(f"a cat [[ark:{code}]]", "", Choices("jimeng-4.0", "1:1", "2k"))
    error = caught.value
    status = ERRORS[code][0]
    assert (error.kind, error.status, error.code) == (kind, status, code)
    assert str(error).startswith(f"ark: HTTP {status} {code}: ")
    assert words in str(error)
    assert error.reached
    assert error.moderated == ("SensitiveContent" in code)
    # Ark bills generated images only; whether a blocked output image is billed is not documented.
    assert error.paid is (None if code.startswith("OutputImage") else False)
    assert (error.retry_after is not None) == (kind is TRANSIENT and status == 429)
    assert KEY not in str(error) and KEY not in error.detail


async def test_a_429_honours_retry_after_and_goes_without_when_absent(session, fake, monkeypatch):
    client = client_for(session, fake)
    monkeypatch.setattr(fake.sandbox.config, "retry_after", 7)
    with pytest.raises(ArkError) as caught:
        await client.generate("busy [[ark:ModelAccountIpmRateLimitExceeded]]", "", Choices("jimeng-4.0", "1:1", "2k"))
    assert (caught.value.kind, caught.value.retry_after) == (TRANSIENT, 7.0)

    monkeypatch.setattr(fake.sandbox.config, "retry_after", None)
    with pytest.raises(ArkError) as caught:
        await client.generate("busy [[ark:ServerOverloaded]]", "", Choices("jimeng-4.0", "1:1", "2k"))
    assert (caught.value.kind, caught.value.retry_after) == (TRANSIENT, None)


async def test_a_spent_budget_answered_with_429_stops_the_queue_instead_of_retrying(session, fake):
    with pytest.raises(ArkError) as caught:
        await client_for(session, fake).generate("[[ark:SetLimitExceeded]]", "", Choices("jimeng-4.0", "1:1", "2k"))
    assert (caught.value.status, caught.value.kind, caught.value.retry_after) == (429, ACCOUNT, None)


async def test_a_transient_failure_then_success_is_two_calls(session, fake):
    client = client_for(session, fake)
    fake.sandbox.script("a boat", ["InternalServiceError", "ok"])
    with pytest.raises(ArkError) as caught:
        await client.generate("a boat", "", Choices("jimeng-4.0", "1:1", "2k"))
    assert caught.value.kind is TRANSIENT
    result = await client.generate("a boat", "", Choices("jimeng-4.0", "1:1", "2k"))
    assert len(result.images) == 1
    assert (fake.sandbox.calls("a boat"), fake.sandbox.images_made("a boat")) == (2, 1)


async def test_watermark_false_is_sent_by_default_and_true_when_set(session, fake):
    await client_for(session, fake).generate("plain", "", Choices("jimeng-4.0", "1:1", "2k"))
    await client_for(session, fake, ark_watermark=True).generate("marked", "", Choices("jimeng-4.0", "1:1", "2k"))
    assert fake.sandbox.received("plain")[0]["watermark"] is False
    assert fake.sandbox.received("marked")[0]["watermark"] is True


async def test_the_negative_prompt_is_not_sent(session, fake):
    await client_for(session, fake).generate("a garden", "no people", Choices("jimeng-4.0", "1:1", "2k"))
    sent = fake.sandbox.received("a garden")[0]
    assert "no people" not in json.dumps(sent)
    assert sent["prompt"] == "a garden"


async def test_a_records_ark_model_is_used_and_a_jimeng_name_means_ark_model(session, fake):
    client = client_for(session, fake)
    await client.generate("default model", "", Choices("jimeng-4.5", "1:1", "2k"))
    result = await client.generate("own model", "", Choices(NEWER_MODEL, "1:1", "2k"))
    assert fake.sandbox.received("default model")[0]["model"] == DEFAULT_MODEL
    assert fake.sandbox.received("own model")[0]["model"] == NEWER_MODEL
    assert result.model == NEWER_MODEL


async def test_a_model_not_activated_stops_the_queue_when_it_is_ark_model(session, fake):
    with pytest.raises(ArkError) as caught:
        await client_for(session, fake, ark_model="doubao-seedream-4-0-999999").generate(
            "a cat", "", Choices("jimeng-4.0", "1:1", "2k")
        )
    error = caught.value
    assert (error.status, error.code, error.kind) == (404, "ModelNotOpen", ACCOUNT)
    assert "model doubao-seedream-4-0-999999 is not activated" in str(error)
    assert "check ARK_MODEL" in str(error)
    assert fake.sandbox.calls("a cat") == 0


async def test_a_records_own_model_not_activated_fails_only_that_record(session, fake):
    with pytest.raises(ArkError) as caught:
        await client_for(session, fake).generate("a cat", "", Choices("ep-20250101000000-nosuch", "1:1", "2k"))
    error = caught.value
    assert (error.status, error.code, error.kind) == (404, "InvalidEndpointOrModel.NotFound", PERMANENT)
    assert "ep-20250101000000-nosuch" in str(error)
    assert "only this record fails" in str(error)


@pytest.mark.parametrize(
    ("headers", "body", "status", "code"),
    [
        ({}, {"model": DEFAULT_MODEL, "prompt": "a cat"}, 401, "AuthenticationError"),
        ({"Authorization": "Bearer nope"}, {"model": DEFAULT_MODEL, "prompt": "a cat"}, 401, "AuthenticationError"),
        (None, {"model": "doubao-seedream-3-0-t2i-250415", "prompt": "a cat"}, 404, "ModelNotOpen"),
        (None, {"model": DEFAULT_MODEL}, 400, "MissingParameter"),
        (None, {"model": NEWER_MODEL, "prompt": "a cat", "size": "1024x1024"}, 400, "InvalidParameter.size"),
        (None, {"model": NEWER_MODEL, "prompt": "a cat", "size": "1K"}, 400, "InvalidParameter.size"),
        (None, {"model": DEFAULT_MODEL, "prompt": "a cat", "size": "8192x8192"}, 400, "InvalidParameter.size"),
        (None, {"model": DEFAULT_MODEL, "prompt": "a cat", "response_format": "png"}, 400, "InvalidParameter"),
        (
            None,
            {
                "model": DEFAULT_MODEL,
                "prompt": "a cat",
                "sequential_image_generation": "auto",
                "sequential_image_generation_options": {"max_images": 16},
            },
            400,
            "InvalidParameter",
        ),
        (None, {"model": DEFAULT_MODEL, "prompt": "a cat", "size": "1024x1024"}, 200, ""),
    ],
)
async def test_the_fake_refuses_what_ark_refuses(session, fake, headers, body, status, code):
    sent = {"Authorization": f"Bearer {KEY}"} if headers is None else headers
    async with session.post(f"{fake.base_url}/images/generations", json=body, headers=sent) as response:
        assert response.status == status
        answer = await response.json()
    if code:
        assert answer["error"]["code"] == code
    else:
        assert answer["data"][0]["size"] == "1024x1024"
        assert answer["usage"]["generated_images"] == 1


@pytest.mark.parametrize("resolution", RESOLUTIONS)
@pytest.mark.parametrize("ratio", RATIOS)
def test_every_size_keeps_its_ratio_and_is_valid_on_every_4x_model(ratio, resolution):
    width, height = SIZES[resolution][ratio]
    across, down = (int(part) for part in ratio.split(":"))
    assert abs(width / height - across / down) / (across / down) < 0.005
    assert 2560 * 1440 <= width * height <= 4096 * 4096
    assert width % 16 == 0 and height % 16 == 0
    assert ark_size(ratio, resolution.upper()) == f"{width}x{height}"


@pytest.mark.parametrize("resolution", RESOLUTIONS)
async def test_the_newer_model_serves_images_of_every_mapped_size(session, fake, resolution):
    client = client_for(session, fake, ark_model=NEWER_MODEL, ark_response_format="b64_json")
    for ratio in RATIOS:
        prompt = f"a kite {ratio} {resolution}"
        result = await client.generate(prompt, "", Choices("jimeng-4.0", ratio, resolution))
        (inline,) = result.images
        assert isinstance(inline, InlineImage)
        assert fake.sandbox.received(prompt)[0]["size"] == ark_size(ratio, resolution)
        assert dimensions(inline.decode()) == SIZES[resolution][ratio]
        assert inline.size == ark_size(ratio, resolution)


async def test_a_wrong_key_is_an_account_error_that_never_shows_the_key(session, fake):
    wrong = "ark-wrong-key-71c2e0aa93"
    with pytest.raises(ArkError) as caught:
        await client_for(session, fake, ark_api_key=wrong).generate("a cat", "", Choices("jimeng-4.0", "1:1", "2k"))
    error = caught.value
    assert (error.status, error.code, error.kind) == (401, "AuthenticationError", ACCOUNT)
    assert "check ARK_API_KEY" in str(error)
    for text in (str(error), repr(error.args), error.detail):
        assert wrong not in text and KEY not in text


async def test_a_dropped_connection_is_transient_and_may_have_been_paid(session, fake):
    with pytest.raises(ArkError) as caught:
        await client_for(session, fake).generate("a cat [[ark:drop]]", "", Choices("jimeng-4.0", "1:1", "2k"))
    error = caught.value
    assert (error.kind, error.reached, error.paid) == (TRANSIENT, True, None)
    assert "connection to" in str(error)


async def test_a_gateway_page_is_transient(session, fake):
    with pytest.raises(ArkError) as caught:
        await client_for(session, fake).generate("a cat [[ark:html-502]]", "", Choices("jimeng-4.0", "1:1", "2k"))
    assert (caught.value.status, caught.value.kind) == (502, TRANSIENT)


async def test_no_answer_within_ark_timeout_is_transient(session, fake):
    with pytest.raises(ArkError) as caught:
        await client_for(session, fake, ark_timeout=1).generate(
            "a cat [[ark:hang]]", "", Choices("jimeng-4.0", "1:1", "2k")
        )
    assert caught.value.kind is TRANSIENT
    assert caught.value.reached
    assert "ARK_TIMEOUT (1 s)" in str(caught.value)


async def test_a_refused_connection_never_reached_ark_and_cost_nothing(session):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ArkError) as caught:
        await ArkClient(session, settings_for(f"http://127.0.0.1:{port}/api/v3")).generate(
            "a cat", "", Choices("jimeng-4.0", "1:1", "2k")
        )
    error = caught.value
    assert (error.kind, error.reached, error.paid) == (TRANSIENT, False, False)
    assert "could not connect" in str(error)
    assert KEY not in str(error)


async def test_the_free_check_accepts_a_good_key_and_names_a_refused_key_or_model(session, fake):
    assert "ARK_API_KEY accepted" in await client_for(session, fake).check()
    with pytest.raises(ArkError) as caught:
        await client_for(session, fake, ark_api_key="ark-wrong-key-0000").check()
    assert (caught.value.kind, caught.value.code) == (ACCOUNT, "AuthenticationError")
    assert "ARK_API_KEY" in str(caught.value)
    with pytest.raises(ArkError) as caught:
        await client_for(session, fake, ark_model="doubao-seedream-4-0-000000").check()
    assert (caught.value.kind, caught.value.code) == (ACCOUNT, "ModelNotOpen")
    assert "doubao-seedream-4-0-000000" in str(caught.value)
    # The check costs nothing: none of its requests carried a prompt, so none could make an image.
    received = fake.sandbox.received()
    assert len(received) == 3
    assert all("prompt" not in body for body in received)


async def test_the_client_is_a_provider_and_needs_a_key(session, fake):
    provider: Provider = client_for(session, fake)
    assert provider.name == "ark"
    with pytest.raises(ConfigError, match="ARK_API_KEY not set"):
        client_for(session, fake, ark_api_key="")


@pytest.mark.parametrize(
    ("name", "value", "words"),
    [
        ("ARK_MAX_IMAGES", "16", "ARK_MAX_IMAGES"),
        ("ARK_MAX_IMAGES", "0", "ARK_MAX_IMAGES"),
        ("ARK_MODEL", "jimeng-4.0", "must be an Ark model id"),
        ("ARK_RESPONSE_FORMAT", "png", "ARK_RESPONSE_FORMAT"),
        ("ARK_BASE_URL", "ark.cn-beijing.volces.com", "must start with http"),
    ],
)
def test_bad_ark_settings_are_refused_with_their_name(monkeypatch, name, value, words):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=words):
        load_settings(None)


def test_ark_timeout_must_fit_the_job_budget_once_ark_is_configured(monkeypatch):
    monkeypatch.setenv("ARK_TIMEOUT", "3500")
    assert load_settings(None).ark_api_key is None  # not configured: not judged
    monkeypatch.setenv("ARK_API_KEY", KEY)
    with pytest.raises(ConfigError, match="ARK_TIMEOUT=3500") as caught:
        load_settings(None)
    assert KEY not in str(caught.value)


@pytest.mark.parametrize(
    ("status", "code", "kind"),
    [
        (400, "InvalidParameter.prompt", PERMANENT),
        (418, "SomethingNew", PERMANENT),
        (403, "SomethingNew", ACCOUNT),
        (429, "SomethingNew", TRANSIENT),
        (503, "", TRANSIENT),
        (403, "QuotaExceeded", ACCOUNT),
    ],
)
def test_codes_win_over_statuses_and_unknown_codes_fall_back_to_the_status(status, code, kind):
    assert classify_error(status, code, DEFAULT_MODEL)[0] is kind


@pytest.mark.parametrize("body", ["<html>oops</html>", '{"data": "nope"}', '{"data": []}'])
def test_an_unreadable_or_empty_success_is_transient(body):
    with pytest.raises(ArkError) as caught:
        parse_generation(200, body, model=DEFAULT_MODEL, sent_at=time.time())
    assert caught.value.kind is TRANSIENT


def test_an_error_body_sent_with_200_is_judged_by_its_code():
    body = json.dumps({"error": {"code": "SetLimitExceeded", "message": "limit reached"}})
    with pytest.raises(ArkError) as caught:
        parse_generation(200, body, model=DEFAULT_MODEL, sent_at=time.time())
    assert (caught.value.kind, caught.value.code) == (ACCOUNT, "SetLimitExceeded")

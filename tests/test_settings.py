"""Settings keep the BullMQ system's names and reject nonsense with one line naming the variable."""

import pytest

from imagegen.clients.layout import FieldLayout, filter_literal
from imagegen.errors import ConfigError
from imagegen.models import validate_prompt_id
from imagegen.settings import load_settings


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for name in (
        "REDIS_PORT",
        "JIMENG_RATIO",
        "JIMENG_MODEL",
        "JIMENG_RESOLUTION",
        "JIMENG_TIMEOUT",
        "TOS_BUCKET",
        "TOS_ENDPOINT",
        "TOS_ADDRESSING_STYLE",
        "TOS_PUBLIC_BASE_URL",
        "POCKETBASE_FIELD_STATUS",
        "POCKETBASE_FIELD_RATIO",
        "POCKETBASE_PASSWORD",
        "TOS_KEY_PREFIX",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


def test_seed_env_file_still_loads(clean_env, tmp_path):
    env = tmp_path / ".env"
    env.write_text(
        "REDIS_HOST=localhost\nREDIS_PORT=6380\nREDIS_PASSWORD=\nREDIS_DB=2\nJIMENG_API_KEY=abc\n"
        "JIMENG_API_URL=https://jimeng-api.example.com/v1\nJIMENG_TIMEOUT=30000\nTOS_BUCKET=kevisual-images\n"
        "TOS_ACCESS_KEY_ID=AK\nTOS_ACCESS_KEY_SECRET=SK\nTOS_REGION=cn-beijing\nTOS_ENDPOINT=tos-cn-beijing.volces.com\n"
        "QUEUE_CONCURRENCY=5\nQUEUE_MAX_FAILED=10\n"
    )
    settings = load_settings(env)
    assert settings.redis_port == 6380
    assert settings.redis_db == 2
    assert settings.jimeng_timeout_seconds == 30
    # The seed's native TOS endpoint is mapped to TOS's S3 endpoint, with one warning line saying so.
    assert settings.tos_endpoint == "https://tos-s3-cn-beijing.volces.com"
    assert settings.tos_public_base_url == "https://kevisual-images.tos-s3-cn-beijing.volces.com"
    assert len(settings.warnings()) == 2
    assert settings.warnings()[0].startswith("TOS_ENDPOINT=tos-cn-beijing.volces.com is TOS's native API")
    assert settings.warnings()[1].startswith("JIMENG_TIMEOUT=30000 ms gives a generation only 30 s")
    assert settings.queue_concurrency == 5


def test_path_style_public_urls(clean_env):
    clean_env.setenv("TOS_BUCKET", "imgs")
    clean_env.setenv("TOS_ENDPOINT", "http://127.0.0.1:9000")
    clean_env.setenv("TOS_ADDRESSING_STYLE", "path")
    assert load_settings(None).tos_public_base_url == "http://127.0.0.1:9000/imgs"


def test_explicit_public_base_wins_and_prefix_is_normalised(clean_env):
    clean_env.setenv("TOS_BUCKET", "imgs")
    clean_env.setenv("TOS_PUBLIC_BASE_URL", "https://cdn.example.com/")
    clean_env.setenv("TOS_KEY_PREFIX", "/generated")
    settings = load_settings(None)
    assert settings.tos_public_base_url == "https://cdn.example.com"
    assert settings.tos_key_prefix == "generated/"


@pytest.mark.parametrize(
    ("name", "value", "words"),
    [
        ("REDIS_PORT", "sixty", "REDIS_PORT"),
        ("REDIS_PORT", "70000", "REDIS_PORT"),
        ("JIMENG_RATIO", "5:5", "JIMENG_RATIO: must be one of"),
        ("JIMENG_RESOLUTION", "8k", "JIMENG_RESOLUTION: must be one of 1k, 2k, 4k"),
        ("JIMENG_MODEL", "jimeng 4.0", "JIMENG_MODEL: must be a model name"),
        ("JIMENG_TIMEOUT", "0", "JIMENG_TIMEOUT"),
        ("TOS_ADDRESSING_STYLE", "sideways", "TOS_ADDRESSING_STYLE"),
        ("POCKETBASE_FIELD_STATUS", 'status" || 1', "POCKETBASE_FIELD_STATUS"),
        ("POCKETBASE_FIELD_RATIO", "aspect ratio", "POCKETBASE_FIELD_RATIO"),
        ("POCKETBASE_FIELD_PRIORITY", "1st", "POCKETBASE_FIELD_PRIORITY"),
        ("POCKETBASE_FIELD_IMAGE_URL", "", "POCKETBASE_FIELD_IMAGE_URL: must be a PocketBase name"),
        ("POCKETBASE_PENDING_VALUES", "pending,done", "POCKETBASE_PENDING_VALUES: done is a status imagegen writes"),
    ],
)
def test_invalid_values_fail_with_one_line_naming_the_variable(clean_env, name, value, words):
    clean_env.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        load_settings(None)
    message = str(caught.value)
    assert words in message
    assert "\n" not in message


def test_secret_values_are_not_echoed_in_errors(clean_env):
    clean_env.setenv("POCKETBASE_PASSWORD", "x" * 3)
    clean_env.setenv("REDIS_PASSWORD", "hunter2-secret")
    clean_env.setenv("REDIS_PORT", "bad")
    with pytest.raises(ConfigError) as caught:
        load_settings(None)
    assert "hunter2-secret" not in str(caught.value)


@pytest.mark.parametrize(
    ("endpoint", "used"),
    [
        ("tos-cn-shanghai.ivolces.com", "https://tos-s3-cn-shanghai.ivolces.com"),
        ("https://tos-ap-southeast-1.volces.com/", "https://tos-s3-ap-southeast-1.volces.com"),
        ("https://tos-s3-cn-beijing.volces.com", "https://tos-s3-cn-beijing.volces.com"),
        ("http://127.0.0.1:9000", "http://127.0.0.1:9000"),
    ],
)
def test_native_tos_endpoints_are_mapped_to_the_s3_ones(clean_env, endpoint, used):
    clean_env.setenv("TOS_ENDPOINT", endpoint)
    settings = load_settings(None)
    assert settings.tos_endpoint == used
    mapped = [w for w in settings.warnings() if w.startswith("TOS_ENDPOINT=")]
    assert len(mapped) == (0 if used.endswith(endpoint.rstrip("/").removeprefix("https://")) else 1)


def test_the_default_settings_carry_no_warning(clean_env):
    assert load_settings(None).warnings() == []


@pytest.mark.parametrize("good", ["abcdefghij12345", "000000000000000"])
def test_valid_prompt_ids(good):
    assert validate_prompt_id(good) == good


@pytest.mark.parametrize(
    "bad",
    ["", "short", "ABCDEFGHIJ12345", "abcdefghij1234567", 'abc" || id != "', "abcdefghij1234 ", "abcdefghij12345\n"],
)
def test_invalid_prompt_ids_are_rejected(bad):
    with pytest.raises(Exception, match="15 characters"):
        validate_prompt_id(bad)


def test_filter_literal_escapes_quotes_and_backslashes():
    assert filter_literal('x" || id != "') == '"x\\" || id != \\""'
    assert filter_literal("a\\b") == '"a\\\\b"'


def test_a_field_set_empty_means_the_collection_has_none(clean_env):
    for name in ("STATUS", "ERROR", "NEGATIVE_PROMPT", "IMAGES"):
        clean_env.setenv(f"POCKETBASE_FIELD_{name}", "")
    clean_env.setenv("POCKETBASE_PENDING_VALUES", " pending , new ,")
    settings = load_settings(None)
    layout = FieldLayout.from_settings(settings)
    assert (layout.status, layout.error, layout.negative_prompt, layout.images) == ("", "", "", "")
    assert layout.states_in_redis and layout.pending_values == ("pending", "new")
    assert layout.pending().filter == 'imageUrl = ""'  # with no status field: no image URL

"""Every reply shape of docs/jimeng-api.md is judged right: links, or the error it really is."""

import json

import pytest

from imagegen.clients.jimeng import parse_generation, parse_retry_after
from imagegen.errors import FailureKind, JimengError


def body(code: int, message: str) -> str:
    return json.dumps({"code": code, "message": message, "data": None}, ensure_ascii=False)


def test_success_returns_every_link_in_order():
    reply = json.dumps(
        {"created": 1733593745, "data": [{"url": f"https://x.byteimg.com/{i}.webp?x-expires=1"} for i in range(4)]}
    )
    generation = parse_generation(200, reply)
    assert generation.urls == [f"https://x.byteimg.com/{i}.webp?x-expires=1" for i in range(4)]
    assert generation.created == 1733593745


@pytest.mark.parametrize(
    ("code", "message", "kind", "words"),
    [
        (-1000, "不支持的参数 size, 请使用 ratio 和 resolution", FailureKind.PERMANENT, "invalid"),
        (-2000, "缺少 Authorization", FailureKind.PERMANENT, "parameters were invalid"),
        (-2001, "请求即梦失败: timeout of 45000ms exceeded", FailureKind.TRANSIENT, "failed upstream"),
        (-2001, "[请求jimeng失败]: shark check reject", FailureKind.ACCOUNT, "risk control"),
        (-2001, "请求即梦失败, 错误码: -4", FailureKind.ACCOUNT, "risk control"),
        (-2002, "token 已失效 login error", FailureKind.ACCOUNT, "expired"),
        (-2006, "内容不合规", FailureKind.PERMANENT, "moderation"),
        (-2007, "图像生成失败", FailureKind.TRANSIENT, "generation failed"),
        (-2007, "图像生成失败, 错误码: 2038", FailureKind.PERMANENT, "moderation"),
        (-2009, "积分不足", FailureKind.ACCOUNT, "credits"),
        (-3000, "something new", FailureKind.TRANSIENT, "unknown error code"),
    ],
)
def test_error_bodies_sent_with_http_200_are_classified(code, message, kind, words):
    with pytest.raises(JimengError) as caught:
        parse_generation(200, body(code, message))
    error = caught.value
    assert error.kind is kind
    assert error.code == code
    assert words in str(error)
    assert str(code) in str(error)


def test_empty_data_is_a_transient_failure_not_a_success():
    with pytest.raises(JimengError) as caught:
        parse_generation(200, json.dumps({"created": 1, "data": []}))
    assert caught.value.kind is FailureKind.TRANSIENT
    assert "no images" in str(caught.value)


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (401, FailureKind.ACCOUNT),
        (403, FailureKind.ACCOUNT),
        (429, FailureKind.TRANSIENT),
        (502, FailureKind.TRANSIENT),
        (503, FailureKind.TRANSIENT),
        (504, FailureKind.TRANSIENT),
        (400, FailureKind.PERMANENT),
    ],
)
def test_real_http_errors_with_openai_bodies(status, kind):
    reply = json.dumps({"error": {"message": "upstream says no", "type": "api_error", "code": status}})
    with pytest.raises(JimengError) as caught:
        parse_generation(status, reply, retry_after=7 if status == 429 else None)
    assert caught.value.kind is kind
    assert caught.value.status == status
    assert "upstream says no" in str(caught.value)
    if status == 429:
        assert caught.value.retry_after == 7


def test_html_error_page_is_transient_and_readable():
    page = (
        "<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway</h1></center></body></html>"
    )
    with pytest.raises(JimengError) as caught:
        parse_generation(502, page)
    assert caught.value.kind is FailureKind.TRANSIENT
    assert "\n" not in str(caught.value)
    assert "502" in str(caught.value)


@pytest.mark.parametrize("reply", ["not json at all", "<html>oops</html>", json.dumps({"unexpected": True})])
def test_non_json_or_odd_body_with_200_is_transient(reply):
    with pytest.raises(JimengError) as caught:
        parse_generation(200, reply)
    assert caught.value.kind is FailureKind.TRANSIENT


@pytest.mark.parametrize(("header", "expected"), [("5", 5.0), ("0.5", 0.5), (None, None), ("soon", None), ("-3", 0.0)])
def test_retry_after_header(header, expected):
    assert parse_retry_after(header) == expected

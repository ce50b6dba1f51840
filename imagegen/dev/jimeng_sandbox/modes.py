"""The outcomes the sandbox can play for one generation call, as the real proxy and its gateways do.

An outcome is chosen by a marker in the prompt (`[[jimeng:-2006]]`), by a script queued for a prompt, or at
random (`fail_rate`) among the transient ones. Error bodies follow docs/jimeng-api.md: the proxy answers its
errors with HTTP 200 and `{"code", "message", "data": null}`.
"""

from __future__ import annotations

import asyncio
import re

from aiohttp import web

MARKER = re.compile(r"\[\[jimeng:([^\]]+)\]\]")

# code -> message, as the proxy words them
PROXY_ERRORS: dict[str, tuple[int, str]] = {
    "-1000": (-1000, "不支持的参数: size, 请使用 ratio 和 resolution 参数"),
    "-2000": (-2000, "请求参数非法: prompt 不能为空"),
    "-2001": (-2001, "[请求jimeng失败]: timeout of 45000ms exceeded"),
    "-2001-shark": (-2001, "[请求jimeng失败]: shark check reject, 错误码: -4"),
    "-2002": (-2002, "[登录失效]: login error (ret 1015), 请重新获取 sessionid"),
    "-2006": (-2006, "[内容违规]: 输入的内容不符合平台规范"),
    "-2007": (-2007, "[图像生成失败]: 生成失败, 请稍后重试"),
    "-2007-2038": (-2007, "[图像生成失败]: 内容审核未通过, 错误码: 2038"),
    "-2009": (-2009, "[积分不足]: 账户积分不足 (ret 5000)"),
}

# real HTTP errors from a gateway in front of the proxy: status, OpenAI-style error type
HTTP_ERRORS: dict[str, tuple[int, str]] = {
    "http-401": (401, "invalid_api_key"),
    "http-403": (403, "permission_denied"),
    "http-429": (429, "rate_limit_exceeded"),
    "http-502": (502, "bad_gateway"),
    "http-503": (503, "service_unavailable"),
    "http-504": (504, "gateway_timeout"),
}

# the call succeeds, but its image links misbehave ("img-500-once": each link fails once, then serves)
IMAGE_MODES = ("img-403", "img-404", "img-500-once", "img-notimage", "img-huge", "img-truncate")

OTHER_MODES = ("ok", "empty", "html-502", "nonjson", "hang", "drop")

# what `fail_rate` picks from: failures worth retrying
TRANSIENT_MODES = ("-2001", "-2007", "empty", "http-429", "http-502", "http-504", "drop")

NGINX_502 = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway</h1></center>\r\n"
    "<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)

EXPIRED_BODY = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
    "<Message>Request has expired</Message></Error>"
)


def slow_delay(mode: str) -> float | None:
    """The seconds a `slow:<seconds>` outcome waits first; None for any other outcome or a bad number."""
    if not mode.startswith("slow:"):
        return None
    try:
        seconds = float(mode[5:])
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


def is_known(mode: str) -> bool:
    if mode.startswith("slow:"):
        return slow_delay(mode) is not None
    return mode in PROXY_ERRORS or mode in HTTP_ERRORS or mode in IMAGE_MODES or mode in OTHER_MODES


def marker_mode(prompt: str) -> str | None:
    """The outcome a prompt asks for with `[[jimeng:<mode>]]`, if any."""
    found = MARKER.search(prompt)
    return found.group(1) if found else None


async def network_fault(request: web.Request, mode: str) -> web.Response | None:
    """How the faults on the way to an API play out, in either fake: a proxy's HTML 502 page, a call that never
    answers, a connection dropped mid-call. None for any other mode."""
    if mode == "html-502":
        return web.Response(status=502, text=NGINX_502, content_type="text/html")
    if mode == "hang":
        await asyncio.sleep(3600)
    if mode == "drop":
        assert request.transport is not None
        request.transport.close()
        raise asyncio.CancelledError
    return None

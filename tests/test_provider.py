"""The provider seam's types: image sources, failures, and what a call that got no answer means."""

import base64

import aiohttp
import pytest

from imagegen.clients.provider import ImageFailure, ImageLink, InlineImage, ProviderResult, transport_failure
from imagegen.errors import FailureKind, JimengError, ProviderError


def test_a_link_lasts_its_lifetime_from_when_the_call_left():
    link = ImageLink.lasting("https://example.test/a.jpeg", 24 * 3600, since=1000.0, size="2048x2048")
    assert link.expires_at == 1000.0 + 24 * 3600
    assert link.seconds_left(now=1000.0 + 3600) == 23 * 3600


def test_inline_images_are_decoded_one_at_a_time_when_asked():
    images = [InlineImage(base64.b64encode(bytes([n]) * 64).decode()) for n in range(3)]
    result = ProviderResult("ark", "doubao-seedream-4-0-250828", tuple(images), (ImageFailure(3, "X", "blocked"),))
    assert result.partial
    assert [image.decode() for image in images] == [bytes([n]) * 64 for n in range(3)]
    with pytest.raises(ValueError, match="not base64"):
        InlineImage("%%%").decode()


def test_a_call_that_never_left_cost_nothing():
    error = ProviderError("no connection", kind=FailureKind.TRANSIENT, reached=False, paid=None)
    assert (error.reached, error.paid) == (False, False)
    jimeng = JimengError("error -2006", kind=FailureKind.PERMANENT, code=-2006, moderated=True)
    assert (jimeng.code, jimeng.moderated, jimeng.reached, jimeng.paid) == (-2006, True, True, None)
    assert str(jimeng) == "jimeng: error -2006"


def test_transport_failures_say_whether_the_request_can_have_left():
    url = "https://ark.test/api/v3/images/generations"
    timeout = transport_failure(TimeoutError(), url, "ARK_TIMEOUT (600 s)")
    assert timeout == ("no answer within ARK_TIMEOUT (600 s)", True)
    dropped = transport_failure(aiohttp.ServerDisconnectedError(), url, "ARK_TIMEOUT (600 s)")
    assert dropped[0].startswith(f"connection to {url} failed (ServerDisconnectedError")
    assert dropped[1] is True

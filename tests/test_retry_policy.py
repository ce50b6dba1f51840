"""Backoff grows exponentially from QUEUE_BACKOFF with bounded jitter, and Retry-After wins when longer."""

import pytest

from imagegen.settings import Settings
from imagegen.worker.jobs import retry_delay


@pytest.fixture
def settings() -> Settings:
    return Settings(_env_file=None, queue_backoff=5)


@pytest.mark.parametrize(("attempt", "low"), [(1, 5), (2, 10), (3, 20)])
def test_exponential_backoff_with_jitter(settings, attempt, low):
    delays = [retry_delay(settings, attempt, None) for _ in range(200)]
    assert min(delays) >= low
    assert max(delays) <= low * 1.25
    assert len(set(delays)) > 1


def test_retry_after_wins_when_longer(settings):
    assert retry_delay(settings, 1, 42.0) == 42.0
    assert 5 <= retry_delay(settings, 1, 1.0) <= 6.25


def test_fractional_backoff(settings):
    quick = Settings(_env_file=None, queue_backoff=0.5)
    assert 0.5 <= retry_delay(quick, 1, None) <= 0.625


def test_backoff_is_capped(settings):
    capped = Settings(_env_file=None, queue_backoff=5, queue_backoff_max=30)
    assert 30 <= retry_delay(capped, 10, None) <= 37.5

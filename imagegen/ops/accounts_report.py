"""The accounts of every provider as `imagegen accounts` and the demo show them: with credits, in words.

Each jimeng account's credits come from the proxy's free `/token/points` route, asked here and now; the
states come from the pool in Redis (`queue/accounts.py`).
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import aiohttp

from imagegen.clients.jimeng import AccountRoutes
from imagegen.models import iso_time
from imagegen.queue.accounts import AccountHealth

from .control import Control


async def accounts_with_credits(control: Control) -> list[AccountHealth]:
    """Every account's health, each jimeng account with its credits as the proxy's free `/token/points` says."""
    async with aiohttp.ClientSession() as http:
        routes = AccountRoutes(http, control.settings)
        return [
            dataclasses.replace(health, credits=await routes.points(health.account.key))
            if health.account.provider == "jimeng"
            else health
            for health in await control.accounts_health()
        ]


def format_accounts(accounts: list[AccountHealth]) -> str:
    """`imagegen accounts` in words: how many keys in which states, then a line per account."""
    return "\n".join([accounts_summary(accounts), *account_lines(accounts)])


def accounts_summary(accounts: list[AccountHealth]) -> str:
    """How many keys each provider has, and in which states."""
    parts = []
    for provider in dict.fromkeys(health.account.provider for health in accounts):
        states = Counter(health.state.value for health in accounts if health.account.provider == provider)
        keys = sum(states.values())
        named = ", ".join(f"{n} {state}" for state, n in states.items())
        parts.append(f"{keys} {provider} key{'s' if keys != 1 else ''}: {named}")
    return "; ".join(parts)


def account_lines(accounts: list[AccountHealth]) -> list[str]:
    lines = []
    for health in accounts:
        when = ""
        if health.until:
            when = f" until {iso_time(health.until)}"
        elif health.since:
            when = f" since {iso_time(health.since)}"
        reason = f": {health.reason}" if health.reason else ""
        credits = f", {health.credits} credits" if health.credits is not None else ""
        lines.append(
            f"{health.account.label}  {health.state.value}{when}, {health.calls_today} calls today, "
            f"{health.in_flight} in flight{credits}{reason}"
        )
    return lines

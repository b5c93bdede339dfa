"""Other processes' metrics served through the gateway's /metrics: `tokenq up` runs the worker, the
webhook service and the batch feeder each with its own metrics port and names them in TOKENQ_METRICS_PEERS
(`role=url,role=url`), so one scrape of the gateway shows every role. Each peer's series get a `role`
label, so two processes' `process_*` series stay apart."""

from __future__ import annotations

import httpx
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from tokenq.settings import METRICS_PEERS_ENV, Settings

TIMEOUT_S = 2.0


def parse_peers(spec: str) -> dict[str, str]:
    """`worker=http://127.0.0.1:9101/metrics,webhooks=...` → {role: url}."""
    peers = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        role, sep, url = item.partition("=")
        if not sep or not role or not url:
            raise ValueError(f"{METRICS_PEERS_ENV}: expected role=url, got {item!r}")
        peers[role.strip()] = url.strip()
    return peers


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


class PeerMetrics:
    def __init__(self, peers: dict[str, str] | None = None) -> None:
        self.peers = peers or {}

    @classmethod
    def from_env(cls) -> PeerMetrics:
        return cls(parse_peers(Settings.from_env().metrics_peers))

    async def render(self) -> bytes:
        """The peers' series in one exposition, labelled by role; a peer that does not answer is left out."""
        if not self.peers:
            return b""
        merged: dict[str, Metric] = {}
        async with httpx.AsyncClient(timeout=TIMEOUT_S, trust_env=False) as client:
            for role, url in self.peers.items():
                try:
                    text = (await client.get(url)).text
                except httpx.HTTPError:
                    continue
                for family in text_string_to_metric_families(text):
                    into = merged.setdefault(family.name, Metric(family.name, family.documentation, family.type,
                                                                 family.unit))
                    into.samples += [s._replace(labels={**s.labels, "role": role}) for s in family.samples]
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Families(list(merged.values())))  # type: ignore[arg-type]
        return generate_latest(registry)

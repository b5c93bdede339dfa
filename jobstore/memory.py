"""Redis's memory as INFO reports it: what `tokenq status` prints and the gateway's /metrics exports. Redis is
the queue, the job store and the caches at once, so its memory is tokenq's first capacity limit."""

from __future__ import annotations

from dataclasses import dataclass

from redis.exceptions import ResponseError

from jobstore.connect import AnyRedis


def evicts(policy: str) -> bool:
    """A maxmemory-policy other than noeviction: at maxmemory Redis drops keys, a job's among them, without an
    error."""
    return policy not in ("", "noeviction")


@dataclass(frozen=True)
class RedisMemory:
    """Redis's INFO memory (of its fullest node, on a cluster). At maxmemory a Redis that cannot evict refuses
    every write while reads go on: the live workers' heartbeats lapse and jobs wait, which the tables alone
    would show as no worker at all. Redis evicts before each command, INFO included, so used_memory still at
    maxmemory here means eviction failed (or is off) and writes are refused."""

    used_memory: int
    maxmemory: int  # 0: no limit
    maxmemory_policy: str
    used_human: str = ""
    maxmemory_human: str = ""

    @property
    def full(self) -> bool:
        return 0 < self.maxmemory <= self.used_memory

    @property
    def evicts(self) -> bool:
        return evicts(self.maxmemory_policy)

    def line(self) -> str:
        return (f"Redis: out of memory (used {self.used_human} of maxmemory {self.maxmemory_human}, policy "
                f"{self.maxmemory_policy}): writes are refused; jobs wait and workers may read as gone until memory "
                "is freed")

    def to_json(self) -> dict:
        return {"used_memory": self.used_memory, "maxmemory": self.maxmemory,
                "maxmemory_policy": self.maxmemory_policy, "full": self.full}


async def read_memory(redis: AnyRedis) -> RedisMemory | None:
    """None where INFO is refused (an ACL user without it, some managed Redis): callers show the rest."""
    try:
        info = await redis.info("memory")
    except ResponseError:
        return None
    nodes = list(info.values()) if info and all(isinstance(v, dict) for v in info.values()) else [info]  # cluster
    return max((RedisMemory(int(n.get("used_memory", 0)), int(n.get("maxmemory", 0)),
                            str(n.get("maxmemory_policy", "")), str(n.get("used_memory_human", "")),
                            str(n.get("maxmemory_human", ""))) for n in nodes),
               key=lambda m: m.used_memory / m.maxmemory if m.maxmemory else 0.0)

"""Every call of a job store script names keys of one Redis Cluster slot (protocol/keys.py's hash tags),
so the same calls run on a cluster; a job id alone names its slot."""

from __future__ import annotations

from redis.crc import key_slot

from jobstore.store import FinalWrite, JobRef
from protocol import keys
from protocol.jobs import new_job_id


def slots(*names: str) -> set[int]:
    return {key_slot(n.encode()) for n in names}


def test_a_jobs_keys_and_its_models_queue_share_one_slot():
    model, tenant = "meta-llama/Llama-3.1-8B-Instruct", "acme"
    job_id = new_job_id(model)
    ref = JobRef(job_id, tenant, model, "interactive")
    submit = [keys.job_key(job_id), keys.idem_key(tenant, "k", model), keys.tenant_counter_key(tenant, model, "rpm", 7),
              keys.tenant_queued_key(tenant, model), ref.stream, keys.lane_tenants_key(model, ref.lane),
              keys.lane_depth_key(model, ref.lane), keys.deadlines_key(model)]
    others = [*FinalWrite(ref, "succeeded").ref.finish_keys(), keys.dead_stream(model), keys.control_channel(model),
              keys.events_channel(job_id), keys.webhook_outbox(model)]
    assert len(slots(*submit, *others)) == 1
    assert keys.job_shard(job_id) == keys.shard(model)


def test_models_spread_over_slots_and_ids_without_a_shard_stay_in_one():
    models = [f"model-{i}" for i in range(64)]
    assert len(slots(*(keys.jobs_stream(m, "default", "t") for m in models))) > 50
    for odd in ("job_nope", "x}y{", "job_12345_6"):
        assert len(slots(keys.job_key(odd), keys.job_text_key(odd), keys.events_channel(odd))) == 1

"""Pure helpers of the publisher: deltas, results, final writes, logprobs; and the worker's id."""

from __future__ import annotations

import json

from protocol.jobs import JobPayload
from protocol.sampling import SamplingParams
from worker.engine.outputs import RequestOutput, TokenLogprobs
from worker.engine_loop import FailedOutput
from worker.publisher import RunningJob, build_result, final_write, to_protocol_logprobs
from worker.service import default_worker_id
from worker.token_text import token_text_from


def job(**sampling) -> RunningJob:
    p = JobPayload(id="job_1", model="m", kind="chat", prompt_token_ids=[1, 2, 3],
                   sampling=SamplingParams(**sampling))
    return RunningJob(payload=p, stream="s", entry_id="1-0", streamed=True, seq=4, started_at=0.0)


def test_deltas_cover_the_text_once_with_increasing_seq():
    j = job()
    j.absorb(RequestOutput("job_1", [7], "Hel"), now=1.0)
    [d1] = j.take_deltas()
    j.absorb(RequestOutput("job_1", [8], ""), now=2.0)  # held back by the detokenizer
    assert j.take_deltas() == []
    j.absorb(RequestOutput("job_1", [9], "lo"), now=3.0)
    [d2] = j.take_deltas()
    assert (d1.seq, d1.offset, d1.text, d1.token_ids) == (5, 0, "Hel", [7])
    assert (d2.seq, d2.offset, d2.text, d2.token_ids) == (6, 3, "lo", [8, 9])
    assert j.first_token_at == 1.0 and j.seq == 6


def test_result_from_outputs():
    j = job(logprobs=1)
    j.absorb(RequestOutput("job_1", [7], "a", num_prompt_tokens=3, num_output_tokens=1, num_cached_tokens=2,
                           logprobs=[TokenLogprobs(7, -0.1, [(7, -0.1)])]), now=1.0)
    j.absorb(RequestOutput("job_1", [8], "b", finished=True, finish_reason="stop", num_prompt_tokens=3,
                           num_output_tokens=2, logprobs=[TokenLogprobs(8, -0.2, [(8, -0.2)])]), now=2.0)
    r = build_result(j, token_text=lambda i: f"<{i}>")
    assert r.text == "ab" and r.finish_reason == "stop" and r.token_ids == [7, 8]
    assert r.usage.model_dump() == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5,
                                    "cached_tokens": 2}
    assert [(lp.token, lp.top) for lp in r.logprobs] == [("<7>", [(7, "<7>", -0.1)]), ("<8>", [(8, "<8>", -0.2)])]
    final = final_write(j, now=2.0)
    assert final.state == "succeeded" and not final.error_json and json.loads(final.result_json)["text"] == "ab"


def test_error_output_becomes_failed_job():
    j = job()
    j.absorb(FailedOutput("job_1", [], "", finished=True, finish_reason="error", error="boom"), now=1.0)
    final = final_write(j, now=2.0)
    assert final.state == "failed" and not final.result_json
    assert json.loads(final.error_json) == {"type": "engine_error", "message": "boom"}


def test_an_error_of_the_request_keeps_its_type():
    j = job()
    j.absorb(FailedOutput("job_1", [], "", finished=True, finish_reason="error", error="bad regex",
                          error_type="invalid_request_error"), now=1.0)
    assert json.loads(final_write(j, now=2.0).error_json) == {"type": "invalid_request_error", "message": "bad regex"}


def test_expired_job_keeps_its_partial_text():
    j = job()
    j.absorb(RequestOutput("job_1", [7], "part", num_prompt_tokens=3, num_output_tokens=1), now=1.0)
    j.stop_state = "expired"
    final = final_write(j, now=2.0)
    assert final.state == "expired" and json.loads(final.result_json)["text"] == "part"
    assert json.loads(final.error_json)["type"] == "deadline_exceeded"


def test_usage_falls_back_to_counts_when_engine_reports_none():
    j = job()
    j.absorb(RequestOutput("job_1", [5, 6], "xy", finished=True, finish_reason="weird"), now=1.0)
    r = build_result(j)
    assert r.finish_reason == "stop"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (3, 2)
    assert r.logprobs is None


def test_choices_have_their_own_deltas_and_the_job_ends_with_the_last():
    j = job(n=3)
    j.absorb(RequestOutput("job_1", [7], "a", num_output_tokens=1), now=1.0)
    j.absorb(RequestOutput("job_1", [8], "xy", index=2, num_output_tokens=1), now=1.0)
    d = j.take_deltas()
    assert [(e.index, e.offset, e.text, e.seq) for e in d] == [(0, 0, "a", 5), (2, 0, "xy", 6)]
    j.absorb(RequestOutput("job_1", [9], "b", index=2, finished=True, finish_reason="stop", stop_reason="!",
                           num_output_tokens=2, choices_left=2), now=2.0)
    assert j.finish_reason is None  # two choices still run
    # A choice that ends before the job says so on its last delta: a stream ends that choice at once.
    assert [(e.index, e.offset, e.text, e.finish_reason, e.stop_reason) for e in j.take_deltas()] == [
        (2, 2, "b", "stop", "!")]
    j.absorb(RequestOutput("job_1", [], "", index=1, finished=True, finish_reason="length", num_output_tokens=0,
                           choices_left=1), now=3.0)
    assert [(e.index, e.text, e.finish_reason) for e in j.take_deltas()] == [(1, "", "length")]  # no text, still
    assert j.take_deltas() == []  # said once
    j.absorb(RequestOutput("job_1", [4], "c", finished=True, finish_reason="stop", num_output_tokens=2), now=3.0)
    assert [(e.index, e.text, e.finish_reason) for e in j.take_deltas()] == [(0, "c", None)]  # the job's end says
    r = build_result(j)
    assert [(c.index, c.text, c.finish_reason, c.stop_reason) for c in r.all_choices()] == [
        (0, "ac", "stop", None), (1, "", "length", None), (2, "xyb", "stop", "!")]
    assert (r.text, r.finish_reason, r.token_ids) == ("ac", "stop", [7, 4])
    assert r.usage.completion_tokens == 4


def test_an_aborted_choice_is_no_early_end():
    """A cancel aborts every choice: the job's final state says how it ended, not a choice's delta."""
    j = job(n=2)
    j.absorb(RequestOutput("job_1", [7], "a", index=1, finished=True, finish_reason="abort", choices_left=1),
             now=1.0)
    assert [(e.index, e.text, e.finish_reason) for e in j.take_deltas()] == [(1, "a", None)]


def test_a_cancelled_job_ends_its_unfinished_choices_as_aborted():
    j = job(n=2)
    j.absorb(RequestOutput("job_1", [7], "a", index=1, finished=True, finish_reason="length", choices_left=1),
             now=1.0)
    j.stop_state, j.finish_reason = "cancelled", "abort"
    r = json.loads(final_write(j, now=2.0).result_json)
    assert [(c["index"], c["finish_reason"]) for c in r["choices"]] == [(0, "abort"), (1, "length")]


def test_a_running_job_cancelled_carries_the_error_a_queued_one_does():
    j = job()
    j.absorb(RequestOutput("job_1", [7], "a", num_prompt_tokens=3, num_output_tokens=1), now=1.0)
    j.stop_state, j.finish_reason = "cancelled", "abort"
    final = final_write(j, now=2.0)
    assert json.loads(final.error_json) == {"type": "cancelled", "message": "the job was cancelled"}
    assert json.loads(final.result_json)["text"] == "a"


def test_logprob_tokens_are_empty_without_a_tokenizer():
    [lp] = to_protocol_logprobs([TokenLogprobs(3, -1.0, [(3, -1.0), (4, -2.0)])], None)
    assert lp.token == "" and lp.top == [(3, "", -1.0), (4, "", -2.0)]


def test_worker_id_is_host_and_pid():
    host, pid = default_worker_id().rsplit(":", 1)
    assert host and pid.isdigit()


def test_token_text_needs_a_loadable_tokenizer():
    from protocol.workers import ModelCard

    assert token_text_from(object(), ModelCard(name="m", max_model_len=8, tokenizer_json="")) is None
    assert token_text_from(object(), ModelCard(name="m", max_model_len=8, tokenizer_json="{bad")) is None

    class Tok:
        def decode(self, ids, skip_special_tokens=False):
            return f"<{ids[0]}>"

    class Engine:
        tokenizer = Tok()

    text = token_text_from(Engine(), ModelCard(name="m", max_model_len=8, tokenizer_json=""))
    assert text is not None and text(5) == "<5>"


class _NoRedis:
    def register_script(self, _script: str):
        return None

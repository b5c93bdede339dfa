"""How a job that failed is answered: its error's type decides the status, its code (where OpenAI has one)
the error's code."""

from __future__ import annotations


def test_a_job_error_with_an_openai_code_answers_with_it_and_as_the_requests_fault():
    """A prompt over a worker's shorter context, refused by the worker: the same 400 and code as the gateway's
    own check gives (clients look for context_length_exceeded to trim a prompt)."""
    from gateway.errors import final_status
    from gateway.jobs import Final
    from gateway.sse import final_error
    from protocol.jobs import JobError, JobState

    final = Final(JobState.failed, None, JobError(type="invalid_request_error", message="too long",
                                                  code="context_length_exceeded"))
    assert final_error(final) == {"message": "too long", "type": "invalid_request_error", "param": None,
                                  "code": "context_length_exceeded"}
    assert final_status(final.state, final_error(final)["type"]) == 400
    plain = Final(JobState.failed, None, JobError(type="engine_error", message="boom"))
    assert final_error(plain)["code"] == "engine_error" and final_status(plain.state, "engine_error") == 500

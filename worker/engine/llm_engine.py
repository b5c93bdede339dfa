"""The engine: requests in, one step at a time, outputs out. Data flows one way through a step:
schedule → prepare inputs → model → sample → append tokens, detokenize, check stops → outputs."""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from protocol.sampling import SamplingParams
from protocol.workers import ModelCard
from tokenq.logs import get_logger
from worker.engine.block_manager import BlockManager
from worker.engine.choices import ChoiceGroup, sequence_params
from worker.engine.config import EngineConfig
from worker.engine.cpu_rank import setup_cpu_rank
from worker.engine.detokenizer import IncrementalDetokenizer
from worker.engine.distributed import destroy_tensor_parallel
from worker.engine.dtypes import DTYPES
from worker.engine.guided import GuidedDecoding, GuidedState, tokenizer_info
from worker.engine.kernel_choice import select_kernels
from worker.engine.launch_totals import LaunchTotals
from worker.engine.model_runner import ModelRunner
from worker.engine.outputs import FailedOutput, RequestOutput
from worker.engine.sampler import PendingSamples, SamplingBatch, make_generator
from worker.engine.scheduler import Scheduler
from worker.engine.sequence import WORST_PRIORITY, Sequence, SequenceStatus
from worker.engine.tp_ranks import TensorParallelGroup, resolve_max_model_len
from worker.models.card import engine_fingerprint, model_card
from worker.models.config import ModelConfig
from worker.models.llama import LlamaForCausalLM
from worker.models.loader import load_model


class RequestTooLong(ValueError):
    error_type = "invalid_request_error"  # the request's fault: a 400, as the gateway's own check answers it


class OutsideVocabulary(ValueError):
    """A token id the model has no row for: the embedding or the sampler would index past its end."""


@dataclass
class _InFlight:
    """A launched step whose tokens the host has not read yet."""

    seqs: list[Sequence]  # those that sample, in the samples' row order
    samples: PendingSamples
    first_tokens: bool  # some sequence samples its first output token in this step


class _RequestState:
    """What the engine keeps per sequence beyond the scheduler's Sequence. A request with n > 1 has one
    sequence per choice: `seq.request_id` is then the sequence's own id, `request_id` the request's."""

    __slots__ = ("seq", "detok", "generator", "stop_ids", "prompt_logprobs_due", "request_id", "index", "group",
                 "guided")

    def __init__(self, seq: Sequence, detok: IncrementalDetokenizer | None, generator: torch.Generator | None,
                 stop_ids: set[int], request_id: str, index: int = 0, guided: GuidedState | None = None) -> None:
        self.seq = seq
        self.detok = detok
        self.generator = generator
        self.stop_ids = stop_ids
        self.guided = guided
        self.prompt_logprobs_due = seq.sampling.prompt_logprobs is not None  # sent with the first token
        self.request_id = request_id
        self.index = index
        self.group: ChoiceGroup | None = None


class LLMEngine:
    def __init__(self, model_path: str | Path, config: EngineConfig | None = None) -> None:
        config = config or EngineConfig()
        model_path = Path(model_path)
        select_kernels(config)
        setup_cpu_rank(config)
        self.tp_group = TensorParallelGroup(model_path, config) if config.tensor_parallel_size > 1 else None
        device = torch.device(config.rank_device(0))
        if device.type == "cuda" and device.index is not None:  # a TP rank's own GPU; plain "cuda" is the current one
            torch.cuda.set_device(device)
        model, model_cfg = load_model(model_path, DTYPES[config.dtype], device, quantization=config.quantization)
        tokenizer = Tokenizer.from_file(str(model_path / "tokenizer.json"))
        self._setup(model, model_cfg, config, tokenizer, model_path)
        self.runner.linked = self.tp_group is not None  # from now on each step goes to the other ranks

    @classmethod
    def from_model(cls, model: LlamaForCausalLM, model_cfg: ModelConfig, config: EngineConfig,
                   tokenizer: Tokenizer | None = None) -> LLMEngine:
        """An engine around a model already on its device (random weights for benchmarks and tests).
        Without a tokenizer outputs carry token ids only, no text, and stop strings are not checked."""
        if config.tensor_parallel_size > 1:
            raise ValueError("tensor parallelism needs a model directory (every rank loads its own shard)")
        select_kernels(config)  # the model's own weights are already loaded (and quantized) by the caller
        engine = cls.__new__(cls)
        engine.tp_group = None
        engine._setup(model, model_cfg, config, tokenizer, None)
        return engine

    def _setup(self, model: LlamaForCausalLM, model_cfg: ModelConfig, config: EngineConfig,
               tokenizer: Tokenizer | None, model_path: Path | None) -> None:
        self.config = config
        self.model_path = model_path
        self.model_cfg = model_cfg
        self.tokenizer = tokenizer
        self.device = torch.device(config.rank_device(0))
        self.dtype = DTYPES[config.dtype]
        self.eos_ids = set(model_cfg.eos_token_ids)
        self.max_model_len = resolve_max_model_len(config, model_cfg)
        if model_cfg.sliding_window and model_cfg.sliding_window < (config.max_model_len or model_cfg.max_position_embeddings):
            get_logger("engine").warning("the model's attention slides; max_model_len capped to its window",
                                         sliding_window=model_cfg.sliding_window)
        self.runner = ModelRunner(model, model_cfg, config, self.dtype, self.device, self.max_model_len)
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size,
                                          config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.block_manager)
        self._requests: dict[str, _RequestState] = {}  # by sequence id
        self._groups: dict[str, ChoiceGroup] = {}  # requests with several sequences, by request id
        self._forking: dict[str, ChoiceGroup] = {}  # those whose other sequences wait for the first's prompt
        self._pending: list[RequestOutput] = []  # outputs produced outside step() (aborts)
        self._in_flight: _InFlight | None = None
        self.launched = LaunchTotals()
        # Step N's samples while step N+1 is launched: guided rows of N+1 need N's tokens for their masks.
        self._launching_after: PendingSamples | None = None
        vocab = model_cfg.vocab_size
        self.guided = (GuidedDecoding(lambda: tokenizer_info(tokenizer, vocab, self.eos_ids), vocab)
                       if tokenizer is not None else None)
        # What start-up built (modules, blocks) lives as long as the engine: freezing it keeps the cyclic
        # GC from rescanning it every few steps (tens of ms a full pass at 512 sequences), as vLLM does.
        gc.collect()
        gc.freeze()

    def close(self) -> None:
        """Stops the other tensor-parallel ranks (a no-op on one rank)."""
        if self.tp_group is None:
            return
        self.runner.stop_followers()
        self.tp_group.join()
        self.tp_group = None
        destroy_tensor_parallel()

    @property
    def ranks_alive(self) -> bool:
        return self.tp_group is None or self.tp_group.alive()

    # ---- requests in -------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams,
                    priority: int = 1, tenant: str = "default") -> None:
        if not prompt_token_ids:
            raise ValueError("prompt must have at least one token")
        if len(prompt_token_ids) >= self.max_model_len:
            raise RequestTooLong(
                f"prompt has {len(prompt_token_ids)} tokens; the model's context is {self.max_model_len}")
        self._check_vocabulary(prompt_token_ids, sampling)
        if "#" in request_id:  # a request's other choices are `<id>#<index>`: an id with one could take theirs
            raise ValueError(f"request id {request_id!r}: '#' is kept for the ids of a request's choices")
        if request_id in self._requests or request_id in self._groups:
            raise ValueError(f"duplicate request id {request_id}")
        states = [self._new_sequence(request_id, i, prompt_token_ids, sampling, priority, tenant)
                  for i in range(sampling.num_sequences)]
        if len(states) > 1:
            group = ChoiceGroup(request_id, sampling, [st.seq for st in states])
            for st in states:
                st.group = group
            self._groups[request_id] = self._forking[request_id] = group
        for st in states:
            self._requests[st.seq.request_id] = st
        self.scheduler.add(states[0].seq)

    def _new_sequence(self, request_id: str, index: int, prompt_token_ids: list[int], sampling: SamplingParams,
                      priority: int, tenant: str) -> _RequestState:
        sampling = sequence_params(sampling, index)
        seq_id = request_id if index == 0 else f"{request_id}#{index}"
        seq = Sequence(seq_id, list(prompt_token_ids), sampling, priority=priority, tenant=tenant,
                       cache_salt=tenant)
        # min_tokens does not hold for constrained output (its grammar decides where it ends).
        detok = (IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids, stop=sampling.stop,
                                        include_stop=sampling.include_stop_str_in_output,
                                        min_tokens=sampling.min_tokens if sampling.guided is None else 0)
                 if self.tokenizer is not None else None)
        generator = make_generator(sampling.seed, self.device) if sampling.seed is not None else None
        stop_ids = set(sampling.stop_token_ids) | (set() if sampling.ignore_eos else self.eos_ids)
        # Each choice has its own matcher: choices sample apart, so each walks the grammar on its own.
        guided = self._start_guided(sampling)
        return _RequestState(seq, detok, generator, stop_ids, request_id, index, guided)

    def _fork_ready(self) -> None:
        """Starts the other sequences of each request whose first has its prompt computed: they share its
        full prompt blocks (the step that computes them is queued on the device ahead of theirs)."""
        for request_id, group in list(self._forking.items()):
            if not group.ready_to_fork():
                continue
            for seq in group.unforked:
                self.block_manager.share_prompt(group.sequences[0], seq)
                self.scheduler.add(seq)
            group.unforked = []
            del self._forking[request_id]

    def _start_guided(self, sampling: SamplingParams) -> GuidedState | None:
        """The request's grammar matcher; a constraint that does not compile fails this request alone."""
        if sampling.guided is None:
            return None
        if self.guided is None:
            raise ValueError("guided decoding needs the model's tokenizer")
        return self.guided.start(sampling.guided)

    def _check_vocabulary(self, prompt_token_ids: list[int], sampling: SamplingParams) -> None:
        """The gateway bounds these already; here a request that got past it fails alone at add instead of
        failing a whole step (on a GPU an index past the end is a device error that no step survives)."""
        vocab = self.model_cfg.vocab_size
        for field, ids in (("prompt", prompt_token_ids), ("stop_token_ids", sampling.stop_token_ids),
                           ("logit_bias", list(sampling.logit_bias or ()))):
            if ids and not 0 <= min(ids) <= max(ids) < vocab:
                bad = next(t for t in ids if not 0 <= t < vocab)
                raise OutsideVocabulary(f"{field}: token id {bad} is outside the vocabulary (size {vocab})")

    def abort_request(self, request_id: str) -> None:
        """Ends the request, every choice of it, with one "abort" output."""
        if (state := self._drop_request(request_id)) is not None:
            self._pending.append(self._output(state, [], "", "abort"))

    def _drop_request(self, request_id: str, but: Sequence | None = None) -> _RequestState | None:
        """Removes every sequence of the request (`but` is finished already); one of their states, None when
        none was left."""
        group = self._groups.pop(request_id, None)
        self._forking.pop(request_id, None)
        seq_ids = [s.request_id for s in group.sequences] if group is not None else [request_id]
        found = None
        for seq_id in seq_ids:
            state = self._requests.pop(seq_id, None)
            if state is not None and state.seq is not but:
                self.scheduler.abort(seq_id)
            found = found or state
        return found

    def has_unfinished_requests(self) -> bool:
        return bool(self._pending) or self.scheduler.has_unfinished()

    def num_admissible(self, priority: int = WORST_PRIORITY) -> int:
        """How many more sequences of `priority` (0 best) intake may pull now: the free sequence slots, plus up
        to `priority_headroom` running seqs of a worse priority, each of which a new one would preempt.
        None while a request of this priority or a better one still waits for blocks or a slot."""
        waiting = self.scheduler.best_waiting_priority()
        if waiting is not None and waiting <= priority:
            return 0
        # Sequences count, not requests: a request's other choices, not yet forked, hold their slots too.
        unforked = sum(len(group.unforked) for group in self._forking.values())
        free = max(self.config.max_num_seqs - self.scheduler.num_running - unforked, 0)
        if self.block_manager.num_free_blocks < 0.05 * self.block_manager.num_blocks:
            free = 0
        return free + min(self.scheduler.num_running_worse_than(priority), self.config.priority_headroom)

    def stats(self) -> dict:
        bm = self.block_manager
        queried = bm.prefix_queries_tokens
        return {
            "running": self.scheduler.num_running,
            "waiting": self.scheduler.num_waiting,
            "kv_usage": bm.usage,
            "prefix_hit_rate": (bm.prefix_hit_tokens / queried) if queried else 0.0,
            # Lifetime totals: the worker turns them into counters (worker/metrics.py).
            "prefix_queries_tokens": queried,
            "prefix_hit_tokens": bm.prefix_hit_tokens,
            "num_preemptions": self.scheduler.num_preemptions,
            "num_blocks": len(bm.blocks),
            **self.launched.as_stats(),
        }

    def model_card(self, name: str) -> ModelCard:
        if self.model_path is None:
            raise ValueError("an engine built from a model object has no model directory to describe")
        numerics = {"dtype": self.config.dtype, "quantization": self.config.quantization,
                    "kv_cache_dtype": self.config.kv_cache_dtype}
        return model_card(self.model_path, name, self.max_model_len, engine_fingerprint(self.model_path, numerics))

    # ---- one step ----------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Launches the next step, then returns the outputs of the one before it.

        One step is always left in flight: step N+1 is scheduled and queued on the device before the host
        waits for step N's tokens, so the host work of a step (scheduling, inputs, detokenizing, stop
        checks) overlaps the GPU's instead of adding to it. A sequence that N samples for gets a stand-in
        token (`Sequence.pending`), which N+1 reads from N's samples on the device. The cost: a sequence
        that N finishes with a stop token was also scheduled in N+1, whose token for it is dropped.
        Exceptions: batches with penalties wait for N first, and so does a step N that carries first
        tokens and has already finished (its outputs return at once; the next call launches N+1). Under the
        scheduler's latency guard, a call that finds N still running waits for the device and returns with N
        in flight and N+1 not launched: what the caller adds meanwhile (a better-priority arrival) joins N+1
        instead of waiting behind it."""
        outputs, self._pending = self._pending, []
        previous, self._in_flight = self._in_flight, None
        if previous is not None and previous.first_tokens and previous.samples.done():
            # The GPU is idle already, so there is nothing to overlap: hand first tokens out now rather
            # than after the next launch (time to first token). The next call launches the next step.
            return outputs + self._finish_step(previous)
        if (previous is not None and not previous.samples.done() and self.scheduler.latency_guarded()
                and self.scheduler.better_arrival() is None):
            previous.samples.wait()
            self._in_flight = previous
            return outputs
        if previous is not None and not self._may_overlap(previous):
            outputs += self._finish_step(previous)
            previous = None
        sched = self.scheduler.schedule()
        for seq in sched.rejected:
            state = self._requests.get(seq.request_id)
            if state is not None:
                self._drop_request(state.request_id, but=seq)
                outputs.append(self._output(state, [], "", "error"))
        launched = None
        if sched.scheduled:
            self._launching_after = previous.samples if previous else None
            try:
                launched = self.runner.launch(sched, self._sampling_batch, self._launching_after)
            finally:
                self._launching_after = None
            self.launched.count(sched)
        if previous is not None:
            outputs += self._finish_step(previous)  # waits for step N while N+1 runs
        if launched is not None:
            # After step N's tokens are in place: newly full blocks are hashed from real tokens.
            self.scheduler.update_after_step(sched)
            if self._forking:
                self._fork_ready()
            seqs, samples = launched
            if samples is not None:
                self._in_flight = _InFlight(seqs, samples, any(s.num_output_tokens == 0 for s in seqs))
                for row, seq in enumerate(seqs):
                    if seq.status is SequenceStatus.RUNNING and not self._at_length_limit(seq, coming=1):
                        seq.append_token(-1)  # a stand-in: step N+1 reads the real one on the device
                        seq.pending = row
        return outputs

    def _may_overlap(self, in_flight: _InFlight) -> bool:
        """Penalties count the output tokens on the host, so their batches wait for the real ones."""
        return not any(s.sampling.has_penalties for s in in_flight.seqs)

    def _at_length_limit(self, seq: Sequence, coming: int = 0) -> bool:
        """max_tokens or the context reached, counting `coming` tokens not appended yet (1: the token being
        sampled is the seq's last whatever it is, so no step comes after it)."""
        return (seq.num_output_tokens + coming >= seq.sampling.max_tokens
                or seq.num_tokens + coming >= self.max_model_len)

    def _finish_step(self, in_flight: _InFlight) -> list[RequestOutput]:
        """Waits for a launched step's samples and turns them into outputs: tokens in place of their
        stand-ins, detokenized, stop and length checks."""
        seqs, samples = in_flight.seqs, in_flight.samples.result()
        outputs = []
        for i, seq in enumerate(seqs):
            token = samples.token_ids[i]
            state = self._requests.get(seq.request_id)
            live = state is not None and state.seq is seq  # not finished by the step before, nor aborted
            if seq.pending == i:
                seq.token_ids[-1] = token
                seq.pending = -1
            elif live:
                seq.append_token(token)
            if not live:
                continue
            error = samples.errors.get(i)
            if error is None and state.guided is not None:
                state.guided.advance(seq.output_token_ids, lambda token=token: token)
                error = state.guided.error
            if error is not None:  # fails the request, every choice of it
                self.scheduler.finish(seq, "error")
                self._drop_request(state.request_id, but=seq)
                outputs.append(self._failed(state, error))
                continue
            if seq.sampling.max_tokens == 0:  # the prompt only was asked for: its token is not one to keep
                seq.token_ids.pop()
                self.scheduler.finish(seq, "length")
                del self._requests[seq.request_id]
                out = self._output(state, [], "", "length")
                out.prompt_logprobs = [None, *seq.prompt_logprobs]
                outputs.append(out)
                continue
            reason = self._finish_reason(state, token)
            stop_reason = self._stop_token(seq, token) if reason == "stop" else None
            delta, stopped = "", False
            if state.detok is not None and (token not in state.stop_ids or seq.sampling.include_stop_str_in_output):
                delta, stopped = state.detok.update([token])
                if stopped and reason != "stop":
                    reason, stop_reason = "stop", state.detok.matched_stop
            if reason is not None:
                if not stopped and state.detok is not None:
                    delta += state.detok.flush()  # release text held back for a stop string that never came
                self.scheduler.finish(seq, reason)
                del self._requests[seq.request_id]
            lp = samples.logprobs[i] if samples.logprobs else None
            out = self._output(state, [token], delta, reason, [lp] if lp is not None else None, stop_reason)
            if state.prompt_logprobs_due:
                out.prompt_logprobs = [None, *seq.prompt_logprobs]
                state.prompt_logprobs_due = False
            if state.group is None:
                outputs.append(out)
            else:
                outputs += state.group.collect(out)
                if not state.group.running:
                    del self._groups[state.request_id]
        return outputs

    def _stop_token(self, seq: Sequence, token: int) -> int | None:
        """vLLM's stop_reason for a stop token: the id when it is one of stop_token_ids (EOS itself: None)."""
        sampling = seq.sampling
        if token in sampling.stop_token_ids and (sampling.ignore_eos or token not in self.eos_ids):
            return token
        return None

    def _finish_reason(self, state: _RequestState, token: int) -> str | None:
        seq = state.seq
        if token in state.stop_ids:  # the sampler forbids these until min_tokens is reached
            return "stop"
        if state.guided is not None and state.guided.terminated:  # a stop token the grammar ended on
            return "stop"
        if self._at_length_limit(seq):
            return "length"
        return None

    def _sampling_batch(self, seqs: list[Sequence]) -> SamplingBatch:
        """Called by the runner once the step's forward is queued: host work here overlaps the GPU's."""
        states = [self._requests[s.request_id] for s in seqs]
        batch = SamplingBatch(
            params=[s.sampling for s in seqs],
            # Only penalties read the output so far; copying every sequence's output each step is waste.
            output_token_ids=[s.output_token_ids if s.sampling.has_penalties else [] for s in seqs],
            prompt_token_ids=[s.prompt_token_ids for s in seqs],
            generators=[st.generator for st in states],
            # A grammar decides where guided output ends: min_tokens would forbid the stop it allows.
            stop_ids_until_min=[
                st.stop_ids if s.num_output_tokens < s.sampling.min_tokens and st.guided is None else set()
                for s, st in zip(seqs, states, strict=True)
            ],
        )
        guided = [(i, st) for i, st in enumerate(states) if st.guided is not None]
        if guided:
            self._guided_masks(batch, [(i, seqs[i], st.guided) for i, st in guided])
        return batch

    def _guided_masks(self, batch: SamplingBatch, rows: list[tuple[int, Sequence, GuidedState]]) -> None:
        """Brings each matcher up to the sequence's last token (step N's, read from its samples when still a
        stand-in), then fills the allowed tokens of the rows it constrains."""
        assert self.guided is not None
        carried: list[int] | None = None

        def pending_of(seq: Sequence) -> int:
            nonlocal carried
            if carried is None:
                assert self._launching_after is not None, "a stand-in token without a step in flight"
                carried = self._launching_after.result().token_ids
            return carried[seq.pending]

        live = []
        for i, seq, state in rows:
            state.advance(seq.output_token_ids, lambda seq=seq: pending_of(seq))
            if state.wants_mask:  # an ended or broken matcher's row is dropped when its step finishes
                live.append((i, state))
        if live:
            batch.guided_rows = [i for i, _ in live]
            batch.guided_mask, batch.guided_index = self.guided.mask([st for _, st in live], batch.guided_rows,
                                                                     self.device)

    @staticmethod
    def _output(state: _RequestState, tokens: list[int], delta: str, reason: str | None,
                logprobs: list | None = None, stop_reason: str | int | None = None) -> RequestOutput:
        seq = state.seq
        return RequestOutput(
            request_id=state.request_id,
            index=state.index,
            stop_reason=stop_reason,
            new_token_ids=tokens,
            text_delta=delta,
            finished=reason is not None,
            finish_reason=reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=seq.num_output_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            logprobs=logprobs,
        )

    @staticmethod
    def _failed(state: _RequestState, error: str) -> FailedOutput:
        seq = state.seq
        return FailedOutput(request_id=state.request_id, index=state.index, new_token_ids=[], text_delta="",
                            finished=True, finish_reason="error", num_prompt_tokens=seq.num_prompt_tokens,
                            num_output_tokens=seq.num_output_tokens, num_cached_tokens=seq.num_cached_tokens,
                            error=error)

    # ---- offline use (benchmarks, tests) -----------------------------------------------------------

    def generate(self, prompts: list[list[int]], sampling: SamplingParams | list[SamplingParams]
                 ) -> list[RequestOutput]:
        """Runs prompts to completion; returns one aggregated output per prompt (its first choice), in order."""
        return [choices[0] for choices in self.generate_choices(prompts, sampling)]

    def generate_choices(self, prompts: list[list[int]], sampling: SamplingParams | list[SamplingParams]
                         ) -> list[list[RequestOutput]]:
        """Runs prompts to completion; per prompt, one aggregated output per choice, by index."""
        params = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
        results: dict[tuple[str, int], RequestOutput] = {}
        base = f"gen-{time.monotonic_ns()}-"
        for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
            self.add_request(base + str(i), p, sp)
        while self.has_unfinished_requests():
            for out in self.step():
                key = (out.request_id, out.index)
                results.setdefault(key, RequestOutput(out.request_id, [], "", index=out.index)).extend(out)
        return [[results[base + str(i), k] for k in range(sp.n) if (base + str(i), k) in results]
                for i, sp in enumerate(params)]

"""Ranks 1..N-1 of a tensor-parallel engine: started by rank 0, one process each, each following rank 0's
steps (step_link) on its own device with its own shard of the model, KV cache and CUDA graphs."""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import socket
import threading
import time
from pathlib import Path

import structlog
import torch

from tokenq.logs import configure_logging
from worker.engine.config import EngineConfig
from worker.engine.cpu_rank import setup_cpu_rank
from worker.engine.distributed import init_tensor_parallel
from worker.engine.dtypes import DTYPES
from worker.engine.kernel_choice import select_kernels
from worker.engine.model_runner import ModelRunner
from worker.models.config import ModelConfig
from worker.models.loader import load_model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_max_model_len(config: EngineConfig, model_cfg: ModelConfig) -> int:
    """The flag's max_model_len, within the model's positions and, where its attention slides, within one
    window: our attention sees every earlier token, which is the window's attention only that far."""
    limit = min(model_cfg.max_position_embeddings, model_cfg.sliding_window or model_cfg.max_position_embeddings)
    return min(config.max_model_len or limit, limit)


class TensorParallelGroup:
    """Rank 0's handle on the other ranks: starts them, joins the group with them, stops them."""

    def __init__(self, model_path: Path, config: EngineConfig) -> None:
        self.size = config.tensor_parallel_size
        port = free_port()
        ctx = mp.get_context("spawn")  # CUDA cannot be forked into a child
        pipes = [ctx.Pipe(duplex=False) for _ in range(1, self.size)]
        self.procs = [ctx.Process(target=_rank_main, args=(rank, port, str(model_path), config, send),
                                  name=f"tokenq-tp-rank{rank}", daemon=True)
                      for rank, (_, send) in enumerate(pipes, start=1)]
        for proc in self.procs:
            proc.start()
        for _, send in pipes:
            send.close()  # each child holds its own end: end-of-file here once it is gone
        self._await_joining([recv for recv, _ in pipes])
        init_tensor_parallel(0, self.size, port, torch.device(config.rank_device(0)))

    def _await_joining(self, pipes: list[mp.connection.Connection]) -> None:
        """Waits until every other rank is about to join the group. The group's rendezvous waits for a rank
        that never comes for as long as the idle timeout, so a rank that fails first (its device, an
        import) is an error here instead of a hang."""
        waiting = dict(zip(pipes, self.procs, strict=True))
        while waiting:
            for conn in mp.connection.wait(list(waiting)):
                proc = waiting.pop(conn)
                try:
                    conn.recv()
                except EOFError:
                    proc.join(5.0)
                    self.join(0.0)
                    raise RuntimeError(f"{proc.name} exited (code {proc.exitcode}) before joining the "
                                       "tensor-parallel group; its error is above") from None

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def join(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.terminate()


def exit_with_parent() -> None:
    """A rank (or the engine process) whose parent is gone exits: nothing else would ever stop it."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _rank_main(rank: int, port: int, model_path: str, config: EngineConfig, joining: mp.connection.Connection) -> None:
    # A Ctrl-C reaches the whole process group; stopping is rank 0's to order (after the worker's drain).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_logging("engine", at_least="WARNING")  # what rank 0 logs at start-up, every rank would repeat
    structlog.contextvars.bind_contextvars(rank=rank)
    exit_with_parent()
    device = torch.device(config.rank_device(rank))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    select_kernels(config)
    setup_cpu_rank(config)
    joining.send(rank)
    joining.close()
    init_tensor_parallel(rank, config.tensor_parallel_size, port, device)
    model, model_cfg = load_model(model_path, DTYPES[config.dtype], device, quantization=config.quantization)
    runner = ModelRunner(model, model_cfg, config, DTYPES[config.dtype], device,
                         resolve_max_model_len(config, model_cfg))
    runner.follow()

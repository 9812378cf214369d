"""The executor: loaded models with their runners, and the decode stage."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from streaminfer.server import affinity
from streaminfer.server.batcher import ModelRunner, WorkItem
from streaminfer.server.config import ServerConfig
from streaminfer.server.decode import DecodeStage
from streaminfer.server.models import build_model, resolve_device

logger = logging.getLogger(__name__)


class Executor:
    """Owns every model runner and the decode pool of one server process."""

    def __init__(self, config: ServerConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.runners: dict[str, ModelRunner] = {}
        self.load_seconds: dict[str, float] = {}
        self.decode = DecodeStage(config.decode_threads)
        self._clock = clock

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        torch_threads = self.config.resolved_torch_threads()
        inference_cpus = None
        if self.config.inference_cpus:
            inference_cpus, rest = affinity.split_cpus(self.config.inference_cpus)
            # Before any runner or decode thread starts, so that they inherit it.
            threads = affinity.pin_process(rest)
            logger.info(
                "inference threads pinned to CPU(s) %s; every other thread to CPU(s) %s "
                "(%d running now, and those started later)",
                affinity.format_cpus(inference_cpus),
                affinity.format_cpus(rest),
                threads,
            )
            if torch_threads > len(inference_cpus):
                logger.warning(
                    "server.torch_threads = %d is more than the %d inference CPU(s) %s: each model's intra-op "
                    "threads share them; set torch_threads to 0 for one per CPU",
                    torch_threads,
                    len(inference_cpus),
                    affinity.format_cpus(inference_cpus),
                )
        for model_config in self.config.models:
            model = build_model(model_config)
            device = resolve_device(model_config.device)
            started = time.perf_counter()
            # Loading reads weights from disk and may compile; keep it off the loop.
            await asyncio.to_thread(model.load, device)
            self.load_seconds[model_config.name] = time.perf_counter() - started
            logger.info(
                "loaded model %s (%s) on %s in %.2f s, %d instance(s), max batch %d, max queue delay %.1f ms",
                model_config.name,
                model_config.kind,
                device,
                self.load_seconds[model_config.name],
                model_config.instances,
                model_config.batching.max_batch_size,
                model_config.batching.max_queue_delay_ms,
            )
            runner = ModelRunner(
                model, model_config, device, self._deliver, loop, torch_threads, self._clock, cpus=inference_cpus
            )
            runner.start()
            self.runners[model_config.name] = runner
        self.decode.start()

    async def aclose(self) -> None:
        await self.decode.aclose()
        for runner in self.runners.values():
            await asyncio.to_thread(runner.stop)
            stats = runner.stats
            logger.info(
                "model %s: %d batches, %d items, mean batch size %.1f, closed full %d, closed by delay %d, "
                "inference %.2f s",
                runner.config.name,
                stats.batches,
                stats.items,
                stats.mean_batch_size(),
                stats.closed_full,
                stats.closed_delay,
                stats.inference_seconds,
            )
        decode = self.decode.stats
        logger.info(
            "decode: %d jobs in %d hand-offs on %d thread(s), %.2f s busy, %d failed",
            decode.jobs,
            decode.hand_offs,
            self.decode.lanes,
            decode.busy_seconds,
            decode.failed_jobs,
        )

    def _deliver(self, items: list[WorkItem]) -> None:
        """Route a finished batch to its streams, one call per stream and model."""
        groups: dict[tuple[int, int], list[WorkItem]] = {}
        for item in items:
            groups.setdefault((id(item.owner), id(item.slot)), []).append(item)
        for group in groups.values():
            owner = group[0].owner
            try:
                owner.on_items_done(group[0].slot, group)  # type: ignore[attr-defined]
            except Exception:
                # One stream's bookkeeping bug must not stop delivery to the others.
                logger.exception("stream %s: routing results failed", owner.options.stream_id)

"""The models behind the server: the LCM, the teacher, and LCM-LoRA stacks on the teacher by registered name,
sampled through one ``Batcher`` so that concurrent compatible requests share a UNet batch.

Image b of a request depends on its seed only (``Bundle.generate``'s per-image noise streams), so a request's
images are those of a solo run whatever it was batched with (up to float rounding of the batched matmuls).
"""
from __future__ import annotations

import dataclasses
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import registry
from ..bundle import Bundle
from ..errors import ModelError
from ..images import to_pixels
from .batcher import Batcher, Ticket
from .validate import Limits, Request

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class ServeConfig:
    """What ``lcm serve`` loads and how it batches; the speed-ups are checked against fp32 in reports/serve/."""

    lcm: str = "lcm"                        # shipped name or LCM folder
    teacher: str | None = "teacher"         # shipped name or teacher folder; None: no teacher, no LoRAs
    loras: dict[str, str] = field(default_factory=dict)  # registered LoRA name -> file or folder (operator's)
    max_batch: int = 16                     # images per UNet batch; 1 turns batching off
    window_ms: float = 20.0                 # how long a batch waits for compatible requests
    max_queue: int = 64                     # waiting requests before "busy" (HTTP 429)
    dtype: str = "fp32"                     # "bf16": opt-in bfloat16 autocast
    compile: bool = False                   # opt-in torch.compile of the UNets (a long-running server)
    channels_last: bool = True              # VAE in channels_last
    prompt_cache: int = 256                 # LRU prompt encodings per model (0: off)
    max_lora_stacks: int = 2                # LoRA'd teachers kept loaded (LRU)
    device: str = "cpu"
    warmup: bool = True                     # one small batch per model at start (and compilation)
    runtime: str = "torch"                  # the LCM's: torch weights, or an export's graphs on "onnx" / "openvino"
    limits: Limits = field(default_factory=Limits)


@dataclass
class Reply:
    """A request's images (uint8 [H, W, 3] each) and where its time went."""

    images: list[np.ndarray]
    seeds: list[int]
    model: str
    timings: dict


class Service:
    """Loaded models and the batcher; ``submit`` / ``generate`` take validated ``Request`` objects."""

    def __init__(self, config: ServeConfig | None = None):
        self.config = config = config or ServeConfig()
        if config.dtype not in DTYPES:
            raise ModelError(f"dtype must be one of {', '.join(DTYPES)}, got {config.dtype!r}")
        self.lcm = self._load_lcm(config)
        if not self.lcm.is_lcm:
            raise ModelError(f"--lcm {config.lcm} is a diffusion teacher, not an LCM folder")
        self.teacher = None
        self.teacher_dir = None
        if config.teacher:
            self.teacher_dir = registry.resolve(config.teacher)
            self.teacher = self._prepare(Bundle.load(self.teacher_dir))
            if self.teacher.is_lcm:
                raise ModelError(f"--teacher {config.teacher} is an LCM, not a diffusion teacher")
        self.lora_files = {}
        for name, path in config.loras.items():
            if not path or not Path(path).exists():
                raise ModelError(f"LoRA {name!r}: {path} does not exist")
            if self.teacher is None:
                raise ModelError("LoRAs stack on the teacher: serve a --teacher to register them")
            self.lora_files[name] = str(Path(path).resolve())
        b = self.lcm
        multiple = b.vae_factor * 2 ** (len(b.unet.config.block_out_channels) - 1)
        self.limits = dataclasses.replace(config.limits, size_multiple=multiple,
                                          default_size=b.default_size,
                                          original_inference_steps=b.original_inference_steps,
                                          lcm_guidance_mode=b.guidance_mode, lcm_unguided_w0=b.unguided_w0,
                                          lcm_guidance=b.defaults[2])
        self._stacks: OrderedDict[tuple, Bundle] = OrderedDict()
        self._lock = threading.Lock()  # the worker and warm-up never sample at once
        self.started = time.time()
        if config.warmup:
            self._warmup()
        self.batcher = Batcher(self._run, max_batch=config.max_batch, window_s=config.window_ms / 1000,
                               max_queue=config.max_queue)

    def _load_lcm(self, config: ServeConfig) -> Bundle:
        """The LCM: torch weights made ready (``_prepare``), or an exported folder's graphs on its runtime."""
        if config.runtime == "torch":
            return self._prepare(Bundle.load(registry.resolve(config.lcm)))
        if config.dtype != "fp32" or config.compile or config.device != "cpu":
            raise ModelError(f"runtime {config.runtime} runs the export's fp32 graphs on the CPU: it takes no bf16, "
                             "compile or other device")
        from ..bundle.runtime import load_runtime

        bundle = load_runtime(registry.resolve(config.lcm), config.runtime)
        bundle.prompt_cache.resize(config.prompt_cache)
        return bundle

    def _prepare(self, bundle: Bundle) -> Bundle:
        c = self.config
        bundle.to(c.device)
        return bundle.optimize(prompt_cache=c.prompt_cache, dtype=DTYPES[c.dtype], channels_last_vae=c.channels_last,
                               compile_unet=c.compile)

    def _warmup(self) -> None:
        size = self.limits.default_size
        warm = [Request("warm-up", model="lcm", steps=1, height=size, width=size)]
        if self.teacher is not None:
            warm.append(Request("warm-up", model="teacher", steps=1, height=size, width=size))
        for request in warm:
            self._run(request.batch_key, [request])

    # --- requests -----------------------------------------------------------------------------------

    def submit(self, request: Request) -> Ticket:
        """Queue a validated request; ``ticket.future.result()`` is its ``Reply``. Raises Busy / Stopped."""
        if request.model == "teacher" and self.teacher is None:
            from .validate import BadRequest
            raise BadRequest("this server has no teacher (started without --teacher)")
        return self.batcher.submit(request.batch_key, request, request.num_images)

    def generate(self, request: Request, timeout: float | None = None) -> Reply:
        """Submit and wait (the UI's path); raises what the batch raised."""
        return self.submit(request).future.result(timeout)

    def close(self) -> None:
        self.batcher.stop()

    def bundle_for(self, request: Request) -> Bundle:
        """The Bundle that samples a request: the LCM, the teacher, or the teacher with its LoRA stack."""
        if request.model == "teacher":
            return self.teacher
        if not request.loras:
            return self.lcm
        stack = self._stacks.get(request.loras)
        if stack is None:
            stack = Bundle.load(self.teacher_dir, loras=[(self.lora_files[n], w) for n, w in request.loras])
            c = self.config
            stack.to(c.device).optimize(prompt_cache=c.prompt_cache, dtype=DTYPES[c.dtype],
                                        channels_last_vae=c.channels_last)
            self._stacks[request.loras] = stack
            while len(self._stacks) > self.config.max_lora_stacks:
                self._stacks.popitem(last=False)
        self._stacks.move_to_end(request.loras)
        return stack

    def _run(self, key, requests: list[Request]) -> list[Reply]:
        """One batch of requests with equal ``batch_key``: one sampling call, split back per request."""
        first = requests[0]
        prompts = [r.prompt for r in requests for _ in range(r.num_images)]
        seeds = [s for r in requests for s in r.seeds]
        start = time.perf_counter()
        with self._lock:
            bundle = self.bundle_for(first)
            if first.image is not None:
                images = torch.cat([r.image.expand(r.num_images, -1, -1, -1) for r in requests])  # [B, 3, H, W]
                out = bundle.decode(bundle.img2img_latents(prompts, seeds, images, options=first.options))
            else:
                out = bundle.generate(prompts, seeds, options=first.options)
        run_s = time.perf_counter() - start
        arrays = list(to_pixels(out))  # uint8 [H, W, 3] each, the rounding of images.save_grid
        results, i = [], 0
        label = first.model if not first.loras else "teacher+" + "+".join(f"{n}:{w:g}" for n, w in first.loras)
        for r in requests:
            timings = {"run_s": round(run_s, 4), "batch_images": len(seeds), "batch_requests": len(requests),
                       "per_image_s": round(run_s / len(seeds), 4)}
            results.append(Reply(arrays[i:i + r.num_images], r.seeds, label, timings))
            i += r.num_images
        return results

    def health(self) -> dict:
        """What /health reports: the models, the queue and the batcher's counters."""
        stats = dict(self.batcher.stats)
        return {"status": "ok", "uptime_s": round(time.time() - self.started, 1),
                "models": ["lcm"] + (["teacher"] if self.teacher is not None else []),
                "loras": sorted(self.lora_files), "queue": self.batcher.pending(), "max_queue": self.config.max_queue,
                "batching": self.batcher.batching, "max_batch": self.config.max_batch,
                "window_ms": self.config.window_ms, "dtype": self.config.dtype, "compile": self.config.compile,
                "channels_last": self.config.channels_last, "prompt_cache": dict(self.lcm.prompt_cache_stats),
                "limits": dataclasses.asdict(self.limits), "stats": stats}

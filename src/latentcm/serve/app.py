"""The web demo and HTTP/JSON service of ``lcm serve``: one FastAPI app, one ``Service`` (and its batcher).

    GET  /health          {"status": "ok", models, loras, queue, batcher counters, limits}
    POST /api/generate    JSON request (``validate.FIELDS``) -> {"images": [PNG base64], "seeds", "timings", ...}
    /                     the gradio UI (its own queue bounds UI events; its client API is ``/gradio_api``)

Errors are JSON ``{"error": "<one line>"}``: 400 bad input, 413 too large, 429 busy (the batcher's queue is
full), 503 shutting down, 500 anything else. The server binds 127.0.0.1 unless told otherwise and never
phones home (gradio analytics off, no share links, no fonts or scripts from outside).
"""

import asyncio
import base64
import io
import json
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported anywhere

import fastapi  # noqa: E402,F401 -- the serve extra: an ImportError here is reported by `lcm serve`
import uvicorn  # noqa: E402,F401

from ..defaults import COMPARE_TEACHER_STEPS, IMG2IMG_STRENGTH, LCM_STEPS, RENOISE  # noqa: E402
from ..errors import ModelError, one_line  # noqa: E402
from .batcher import Busy, Stopped  # noqa: E402
from .service import Reply, ServeConfig, Service  # noqa: E402
from .validate import BadRequest, parse_request  # noqa: E402

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860


def png_base64(image) -> str:
    """uint8 [H, W, 3] -> base64 PNG."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def error_status(exc: BaseException) -> tuple[int, str]:
    """(HTTP status, one-line message) of an exception raised while serving a request."""
    if isinstance(exc, BadRequest):
        return exc.status, str(exc)
    if isinstance(exc, Busy):
        return 429, str(exc)
    if isinstance(exc, Stopped):
        return 503, str(exc)
    if isinstance(exc, (ModelError, ValueError)):
        return 400, one_line(exc)
    return 500, f"internal error ({type(exc).__name__}); the server keeps serving"


async def read_body(request, limit: int) -> bytes:
    """The request body, at most ``limit`` bytes; a larger one is drained (so the client reads the answer)
    and refused with 413."""
    declared = request.headers.get("content-length")
    too_big = declared is not None and declared.isdigit() and int(declared) > limit
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            too_big = True
        if not too_big:
            chunks.append(chunk)
        elif size > 16 * limit:  # stop draining a flood; the connection will close
            break
    if too_big:
        raise BadRequest(f"request body of {size if declared is None else int(declared)} bytes is larger than the "
                         f"{limit // 2**20} MB limit (uploads are at most {limit * 3 // 4 // 2**20} MB)", 413)
    return b"".join(chunks)


def result_json(result: Reply, ticket) -> dict:
    timings = dict(result.timings, queue_s=round(ticket.started - ticket.submitted, 4))
    return {"model": result.model, "seeds": result.seeds, "timings": timings,
            "images": [png_base64(a) for a in result.images]}


def create_app(service: Service, *, ui: bool = True, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT):
    """The FastAPI app: the JSON API and health endpoint, with the gradio UI mounted at / when ``ui``."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool

    app = FastAPI(title="latentcm", docs_url=None, redoc_url=None, openapi_url=None)
    limits = service.limits

    def error(exc: BaseException) -> JSONResponse:
        status, message = error_status(exc)
        headers = {"Retry-After": "1"} if status == 429 else None
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.get("/health")
    def health():
        return service.health()

    @app.post("/api/generate")
    async def api_generate(request: Request):
        try:
            body = await read_body(request, limits.max_body_bytes)
            try:
                payload = json.loads(body)
            except (ValueError, UnicodeDecodeError):
                raise BadRequest("the request body is not valid JSON") from None
            req = await run_in_threadpool(parse_request, payload, limits, service.lora_files)
            ticket = service.submit(req)
            result = await asyncio.wrap_future(ticket.future)
            return JSONResponse(await run_in_threadpool(result_json, result, ticket))
        except Exception as exc:  # noqa: BLE001 -- every failure is one JSON line; the server goes on
            return error(exc)

    if ui:
        import gradio as gr

        blocks = build_ui(service)
        blocks.queue(max_size=service.config.max_queue, default_concurrency_limit=service.config.max_queue)
        app = gr.mount_gradio_app(app, blocks, path="/", server_name=host, server_port=port, footer_links=["api"],
                                  max_file_size=limits.max_upload_bytes, ssr_mode=False, mcp_server=False,
                                  enable_monitoring=False, pwa=False, show_error=True)
    return app


# --- the gradio UI ---------------------------------------------------------------------------------------

def _timing_line(name: str, result: Reply, ticket, steps: int) -> str:
    t = result.timings
    return (f"**{name}** ({steps} steps): {len(result.images)} image(s) in {t['run_s']:.3f} s "
            f"(batch of {t['batch_images']} images from {t['batch_requests']} request(s), "
            f"{t['per_image_s'] * 1000:.0f} ms/image; queued {ticket.started - ticket.submitted:.3f} s)")


MODEL_DEFAULT = "the model's own"  # the re-noising choice that leaves it to the served LCM's sampling.json

# Whole images at every page width: the gallery grows with its rows, each image scaled to fit its cell.
GALLERY = {"columns": 4, "format": "png", "height": "auto", "object_fit": "contain"}


def build_ui(service: Service):
    """The gradio Blocks: prompt, steps, guidance, seed, images, TCD gamma, re-noising, LoRA weights, img2img,
    teacher."""
    import gradio as gr

    names = sorted(service.lora_files)[:8]
    with gr.Blocks(title="latentcm: Latent Consistency Model demo", analytics_enabled=False) as demo:
        gr.Markdown("## Latent Consistency Model\nFew-step text-to-image with the shipped LCM of the shapes world, "
                    "beside its teacher. Requests from everyone are batched together on the server.")
        with gr.Row():
            with gr.Column(scale=2):
                inputs = [*_ui_sampling_inputs(gr, service.limits), *_ui_extra_inputs(gr, service, names)]
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=3):
                outputs = [gr.Gallery(label="LCM", elem_id="lcm-gallery", **GALLERY),
                           gr.Gallery(label="Teacher", elem_id="teacher-gallery", **GALLERY),
                           gr.Markdown(elem_id="timings")]
        run = _ui_runner(gr, service, names)
        button.click(run, inputs, outputs, api_name="generate")
        inputs[0].submit(run, inputs, outputs, api_name=False)  # Enter in the prompt box
    return demo


def _ui_sampling_inputs(gr, limits) -> list:
    """[prompt, steps, guidance, seed, num_images, height, width, use_tcd, gamma, renoise]."""
    sizes = dict(minimum=limits.min_size, maximum=limits.max_size, step=limits.size_multiple,
                 value=limits.default_size)
    prompt = gr.Textbox(label="Prompt", value="", placeholder="a large red circle on a blue background",
                        max_length=limits.max_prompt_chars, lines=2, elem_id="prompt")
    with gr.Row():
        steps = gr.Slider(1, limits.max_lcm_steps, value=LCM_STEPS, step=1, label="LCM steps")
        guidance = gr.Slider(1.0, 15.0, value=limits.lcm_guidance, step=0.5, label="Guidance scale g (w = g - 1)")
    with gr.Row():
        seed = gr.Number(value=0, precision=0, minimum=0, maximum=2**31 - 1 - limits.max_images, label="Seed")
        num_images = gr.Slider(1, limits.max_images, value=2, step=1, label="Images")
    with gr.Row():
        height = gr.Slider(label="Height", **sizes)
        width = gr.Slider(label="Width", **sizes)
    with gr.Row():
        use_tcd = gr.Checkbox(value=False, label="TCD sampler (stochasticity gamma)")
        gamma = gr.Slider(0.0, 1.0, value=0.3, step=0.05, label="gamma (0 = deterministic)")
    renoise = gr.Radio([MODEL_DEFAULT, *RENOISE], value=MODEL_DEFAULT, elem_id="renoise",
                       label="Re-noising between LCM steps (keep-means: each channel's mean from the step's own noise "
                             "estimate)")
    return [prompt, steps, guidance, seed, num_images, height, width, use_tcd, gamma, renoise]


def _ui_extra_inputs(gr, service: Service, names: list[str]) -> list:
    """[init_image, strength, compare, teacher_steps, teacher_negative, *lora_weights]."""
    limits = service.limits
    with gr.Accordion("img2img", open=False):
        init_image = gr.Image(type="pil", sources=["upload"], label="Init image (optional)", elem_id="init-image")
        strength = gr.Slider(0.1, 1.0, value=IMG2IMG_STRENGTH, step=0.05, label="Strength (1 redoes everything)")
    with gr.Accordion("LCM-LoRA on the teacher", open=False):
        if names:
            gr.Markdown("Weights above 0 stack these LoRAs on the teacher (instead of the LCM); "
                        "an LCM-LoRA has its guidance distilled in, so the guidance slider is unused.")
        else:
            gr.Markdown("No LoRAs registered (start with `lcm serve --lora NAME=PATH`).")
        lora_weights = [gr.Slider(0.0, limits.lora_weight_range[1], value=0.0, step=0.05, label=n) for n in names]
    with gr.Row():
        compare = gr.Checkbox(value=service.teacher is not None, label="Also run the teacher (DDIM, CFG)",
                              interactive=service.teacher is not None)
        teacher_steps = gr.Slider(1, limits.max_teacher_steps, value=COMPARE_TEACHER_STEPS, step=1,
                                  label="Teacher steps")
    teacher_negative = gr.Textbox(label="Negative prompt (CFG's unconditional branch: the teacher's" + (
                                      ", and this LCM's)" if _lcm_takes_negative(service) else "; this LCM, with "
                                                                                   "guidance as a w input, has none)"),
                                  value="", max_length=limits.max_prompt_chars, elem_id="negative-prompt")
    return [init_image, strength, compare, teacher_steps, teacher_negative, *lora_weights]


def _lcm_takes_negative(service: Service) -> bool:
    """Whether the served LCM takes a negative prompt (``ModelTraits.takes_negative``); none served: no."""
    lcm = getattr(service, "lcm", None)
    return lcm is not None and lcm.traits.takes_negative


def _ui_runner(gr, service: Service, names: list[str]):
    """The UI's callback: the inputs of ``build_ui`` -> (LCM images, teacher images, timing lines)."""
    limits = service.limits

    def run(prompt, steps, guidance, seed, num_images, height, width, use_tcd, gamma, renoise, init_image, strength,
            compare, teacher_steps, teacher_negative, *weights):
        loras = [{"name": n, "weight": float(w)} for n, w in zip(names, weights) if w > 0]
        base = {"prompt": prompt, "seed": int(seed or 0), "num_images": int(num_images), "height": int(height),
                "width": int(width)}
        lcm = dict(base, model="lcm", steps=int(steps), gamma=float(gamma) if use_tcd else None,
                   guidance=None if loras else float(guidance), loras=loras,
                   renoise=None if renoise in (None, MODEL_DEFAULT) else renoise)
        if init_image is not None:
            lcm["strength"] = float(strength)
        if teacher_negative and _lcm_takes_negative(service):
            lcm["negative_prompt"] = teacher_negative  # an unconditional branch to replace (real CFG; CFG at w = 0)
        try:
            requests = [("LCM" if not loras else "LCM-LoRA", int(steps),
                         parse_request(lcm, limits, service.lora_files, image=init_image))]
            if compare and service.teacher is not None:
                teacher = dict(base, model="teacher", steps=int(teacher_steps), negative_prompt=teacher_negative or None)
                requests.append(("Teacher DDIM", int(teacher_steps), parse_request(teacher, limits)))
            tickets = [(name, n_steps, service.submit(req)) for name, n_steps, req in requests]
            done = [(name, n_steps, ticket, ticket.future.result()) for name, n_steps, ticket in tickets]
        except Exception as exc:  # noqa: BLE001 -- shown in the page; the server keeps serving
            raise gr.Error(error_status(exc)[1]) from None
        galleries = [list(done[0][3].images), list(done[1][3].images) if len(done) > 1 else []]
        lines = [_timing_line(name, res, ticket, n) for name, n, ticket, res in done]
        return galleries[0], galleries[1], "  \n".join(lines)
    return run


class Running:
    """A server listening in a background thread (tests, benchmarks): ``url``, ``host``, ``port``, ``stop()``."""

    def __init__(self, server, thread):
        self.server, self.thread = server, thread
        self.host, self.port = server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}/"

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def _server(app, host: str, port: int):
    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                        timeout_graceful_shutdown=5, ws="none"))


def serve_in_thread(service: Service, *, host: str = DEFAULT_HOST, port: int = 0, ui: bool = True,
                    timeout: float = 60.0) -> Running:
    """Start the app for ``service`` on host:port (0: a free port) in a daemon thread; returns once listening."""
    import threading
    import time

    server = _server(create_app(service, ui=ui, host=host, port=port), host, port)
    thread = threading.Thread(target=server.run, name="latentcm-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not (server.started and server.servers):
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    return Running(server, thread)


def run(config: ServeConfig, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, ui: bool = True,
        ready=None) -> None:
    """Load the models, then serve in the foreground until interrupted; ``ready(url)`` once listening."""
    import importlib.util

    if ui and importlib.util.find_spec("gradio") is None:
        raise ImportError("the web UI needs gradio", name="gradio")
    service = Service(config)
    try:
        running = serve_in_thread(service, host=host, port=port, ui=ui)
        if ready is not None:
            ready(running.url)
        try:
            running.thread.join()
        except KeyboardInterrupt:
            running.stop()
    finally:
        service.close()

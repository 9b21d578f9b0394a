"""``lcm serve``: the LCM as a web demo and an HTTP/JSON service that batches concurrent requests.

    validate.py  bounds and parses every client input into a ``Request`` (one-line ``BadRequest`` errors)
    batcher.py   ``Batcher``: a bounded queue and one worker thread that runs compatible requests as one batch
    service.py   ``Service``: the loaded models (LCM, teacher, LCM-LoRA stacks by registered name) behind a Batcher
    app.py       the FastAPI app (``POST /api/generate``, ``GET /health``) with the gradio UI mounted at ``/``
"""

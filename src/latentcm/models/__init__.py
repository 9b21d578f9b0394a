"""Networks: tiny SD ``components``, the ``denoiser`` interface, ``sdxl`` conditioning, the ``judge`` and
``lora`` (adapters and LoRA key formats)."""

"""Everything written for others to load: ``pipeline`` (LCM and fine-tuned teacher folders, their cards),
``lora`` (LCM-LoRA and style-LoRA files in diffusers and kohya keys), ``release`` (a clean release folder,
fp16 variant) and ``single_file`` (all weights in one safetensors file)."""

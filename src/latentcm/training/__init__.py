"""Training: ``loop`` (the one loop: Task, fit, train_step, EMA), ``runs`` (a run folder's resume, checkpoint
saves and metrics.csv), ``checkpoint`` (atomic safetensors checkpoints), ``optim8bit`` (the 8-bit AdamW),
``data`` (every data source), ``consistency`` (LCD / LCF / LCM-LoRA tasks) with ``lcd_config`` (the variant as
data, the distance) and ``precision`` (fp32 outputs under mixed precision), ``diffusion`` (plain diffusion) and
``recipes`` (the CLI's training jobs as data rows of one runner)."""

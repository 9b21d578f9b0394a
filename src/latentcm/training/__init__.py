"""Training: ``loop`` (the one loop: Task, fit, train_step, EMA), ``checkpoint``, ``data`` (every data
source), ``consistency`` (LCD / LCF / LCM-LoRA tasks), ``diffusion`` (plain diffusion) and ``recipes``
(the CLI's training jobs as data rows of one runner)."""

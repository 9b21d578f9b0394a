"""Library code never reaches the network: set the Hugging Face offline switches on import."""
import logging
import os

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "DIFFUSERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# bitsandbytes (optional, for --optimizer adamw8bit; peft imports it when present) warns on import that an
# optional CPU kernel package is missing; that says nothing about this run
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def quiet_loading() -> None:
    """Silence the libraries' weight-loading progress bars and info logs (our CLI prints its own)."""
    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()

"""bitsandbytes' 8-bit AdamW for the loop (``LoopConfig.optimizer = "adamw8bit"``), with a flat state dict so
checkpoints hold one tensor per (parameter, key), or a one-line ValueError saying why it cannot run here."""
from __future__ import annotations

import torch


def adamw8bit(params, cfg, device) -> torch.optim.Optimizer:
    """bitsandbytes' 8-bit AdamW, or a one-line ValueError saying why it cannot be used here."""
    try:
        import bitsandbytes as bnb
    except Exception as exc:  # not installed, or its native library does not load
        raise ValueError(f"--optimizer adamw8bit needs bitsandbytes (pip install bitsandbytes): "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")) from None
    params = list(params)
    where = torch.device(device if device is not None else (params[0].device if params else "cpu"))
    if where.type != "cuda":  # bitsandbytes' CPU support depends on its version and build: probe it once
        try:
            probe = torch.nn.Parameter(torch.zeros(4096, device=where))
            probe.grad = torch.ones_like(probe)
            bnb.optim.AdamW8bit([probe], lr=1e-3).step()
        except Exception as exc:
            raise ValueError(f"--optimizer adamw8bit: bitsandbytes' 8-bit AdamW does not run on {where.type} here "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                             f"use a CUDA GPU or --optimizer adamw") from None
    return _flat_state(bnb.optim.AdamW8bit)(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def _flat_state(cls):
    """``cls`` with a flat state dict (bitsandbytes nests its quantisation state one dict deep; checkpoints hold
    one tensor per (parameter, key)), restored on load."""
    class Flat(cls):
        def state_dict(self):
            sd = super().state_dict()
            state = {pid: {f"{k}/{kk}" if isinstance(v, dict) else k: vv
                           for k, v in st.items() for kk, vv in (v.items() if isinstance(v, dict) else [(None, v)])}
                     for pid, st in sd["state"].items()}
            return {**sd, "state": state}

        def load_state_dict(self, state_dict):
            state = {}
            for pid, st in state_dict["state"].items():
                nested: dict = {}
                for k, v in st.items():
                    if "/" in k:
                        outer, inner = k.split("/", 1)
                        nested.setdefault(outer, {})[inner] = v
                    else:
                        nested[k] = int(v) if k == "step" and torch.is_tensor(v) else v
                state[pid] = nested
            super().load_state_dict({**state_dict, "state": state})
    Flat.__name__ = Flat.__qualname__ = cls.__name__
    return Flat

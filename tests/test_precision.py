"""Memory and precision options of the training loop: bf16 / fp16 mixed precision, gradient accumulation,
the 8-bit optimizer, and the committed Accelerate configs."""
from pathlib import Path

import sys

import pytest
import torch
import yaml

from latentcm import world
from latentcm.bundle import Bundle
from latentcm.training import consistency
from latentcm.training.consistency import LCDConfig, LCDTask, LoRATask
from latentcm.training.data.tensors import encode_pairs
from latentcm.training.loop import LoopConfig, fit, make_accelerator, prepare, train_step
from latentcm.models.lora import LoRAConfig

ROOT = Path(__file__).resolve().parents[1]
# measured on a 2-core CPU: |loss_bf16 - loss_fp32| / loss_fp32 = 0.008, 0.039, 0.014 (steps 1-3; <= 0.039 over
# the first 5) of the micro distillation; the tolerance leaves room for other CPUs' bf16 kernels
BF16_LOSS_RTOL = 0.10


@pytest.fixture(scope="module")
def data(micro_teacher):
    bundle = Bundle.load(micro_teacher)
    pairs = [(s.image, s.text) for s in world.iter_samples(0, 6)]
    return encode_pairs(bundle.vae, bundle.text_encoder, bundle.tokenizer, pairs)


def _task(micro_teacher, data, lora=False, **kw):
    bundle = Bundle.load(micro_teacher)  # a fresh teacher: mixed precision casts it in place
    cfg = LCDConfig(**{"batch_size": 2, "ema_decay": 0.5, **kw})
    if lora:
        return LoRATask(bundle.unet, bundle.scheduler_config, data, cfg, LoRAConfig(rank=4, alpha=4, seed=0))
    return LCDTask(bundle.unet, bundle.scheduler_config, data, cfg)


def _cfg(**kw):
    return LoopConfig(**{"max_steps": 3, "lr": 1e-3, "warmup": 0, "schedule": "constant", "checkpoint_every": 1,
                         **kw})


def _losses(task, cfg, steps=3):
    acc = make_accelerator()
    opt = prepare(task, cfg, acc)
    return [train_step(task, opt, cfg, s, acc)["loss"] for s in range(steps)]


def test_bf16_distillation_is_finite_and_close_to_fp32(micro_teacher, data):
    fp32 = _losses(_task(micro_teacher, data), _cfg())
    bf16 = _losses(_task(micro_teacher, data), _cfg(mixed_precision="bf16"))
    assert all(torch.isfinite(torch.tensor(bf16)))
    for a, b in zip(fp32, bf16):
        assert abs(a - b) <= BF16_LOSS_RTOL * abs(a), (fp32, bf16)


@pytest.mark.parametrize("lora", [False, True])
def test_bf16_stores_teacher_and_target_in_half_and_the_student_in_fp32(micro_teacher, data, lora):
    task = _task(micro_teacher, data, lora=lora)
    cfg = _cfg(mixed_precision="bf16")
    acc = make_accelerator()
    opt = prepare(task, cfg, acc)
    trained = {id(p) for p in task.parameters()}
    assert trained and all(p.dtype == torch.float32 for p in task.parameters())
    if lora:
        frozen = [p for p in task.student_unet.parameters() if id(p) not in trained]
        assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)  # the base UNet = the teacher
    else:
        assert all(p.dtype == torch.bfloat16 for p in task.teacher.parameters())
        assert all(p.dtype == torch.bfloat16 for p in task.target_unet.parameters())
        assert all(p.dtype == torch.float32 for p in task.student_unet.parameters())
    train_step(task, opt, cfg, 0, acc)  # the EMA update keeps the dtypes
    assert all(p.dtype == torch.float32 for p in task.parameters())
    if not lora:
        assert all(p.dtype == torch.bfloat16 for p in task.target_unet.parameters())


def test_bf16_solver_scalings_and_loss_run_in_fp32(micro_teacher, data, monkeypatch):
    task = _task(micro_teacher, data)
    seen: dict[str, list] = {"solver": [], "teacher": [], "distance": [], "c_skip": []}
    solver = task.solver

    def spy_solver(x, s, t, fn, alpha_bar=None):
        def spy_fn(x2, t2):
            x0, eps = fn(x2, t2)
            seen["teacher"] += [x0.dtype, eps.dtype]
            return x0, eps
        out = solver(x, s, t, spy_fn, alpha_bar=alpha_bar)
        seen["solver"] += [x.dtype, out.dtype]
        return out

    real_distance, real_cfn = consistency.distance, consistency.ConsistencyModel.forward

    def spy_distance(pred, target, *a, **kw):
        seen["distance"] += [pred.dtype, target.dtype]
        return real_distance(pred, target, *a, **kw)

    def spy_cfn(self, z_t, t, text, w_emb=None):
        out = real_cfn(self, z_t, t, text, w_emb)
        seen["c_skip"] += [z_t.dtype, out.dtype]
        return out

    task.solver = spy_solver
    monkeypatch.setattr(consistency, "distance", spy_distance)
    monkeypatch.setattr(consistency.ConsistencyModel, "forward", spy_cfn)
    cfg = _cfg(mixed_precision="bf16")
    acc = make_accelerator()
    opt = prepare(task, cfg, acc)
    unet_out = []
    hook = task.teacher.unet.net.register_forward_hook(lambda m, i, o: unet_out.append(o.sample.dtype))
    metrics = train_step(task, opt, cfg, 0, acc)
    hook.remove()
    assert unet_out and set(unet_out) == {torch.bfloat16}  # the teacher UNet itself runs in bf16 ...
    for name, dtypes in seen.items():  # ... and everything after its output in fp32
        assert dtypes and set(dtypes) == {torch.float32}, (name, dtypes)
    assert torch.isfinite(torch.tensor(metrics["loss"]))


class _Doubled:
    """A task whose batch at step s is the two batches 2s and 2s + 1 of ``inner`` concatenated (same samples)."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def batch(self, step):
        a, b = self.inner.batch(2 * step), self.inner.batch(2 * step + 1)
        return {k: torch.cat([a[k], b[k]]) for k in a}


def test_accumulation_of_two_equals_one_batch_twice_as_big(micro_teacher, data):
    accumulated, big = _task(micro_teacher, data), _task(micro_teacher, data)
    ca, cb = _cfg(gradient_accumulation=2), _cfg()
    acc = make_accelerator()
    oa, ob = prepare(accumulated, ca, acc), prepare(_Doubled(big), cb, acc)
    for step in range(3):
        ma = train_step(accumulated, oa, ca, step, acc)
        mb = train_step(_Doubled(big), ob, cb, step, acc)
        # step 0: the same weights, so the same gradient up to float sums; later steps see weights that
        # Adam has already moved apart by float noise (below one lr, see the end), so their gradients
        # differ a little more (measured on one CPU: 1.7e-4 of the largest gradient entry, loss rel 1.2e-4).
        # A wrong accumulation is off by ~50% at step 0.
        tol = 1e-4 if step == 0 else 1e-3
        assert ma["loss"] == pytest.approx(mb["loss"], rel=tol / 2)  # two half-batch means vs one: float order
        assert ma["grad_norm"] == pytest.approx(mb["grad_norm"], rel=tol)
        ga = torch.cat([p.grad.flatten() for p in accumulated.parameters() if p.grad is not None])
        gb = torch.cat([p.grad.flatten() for p in big.parameters() if p.grad is not None])
        assert float((ga - gb).abs().max()) <= tol * float(gb.abs().max())
    # Adam divides by sqrt(v): near-zero gradients turn float noise into differences below one lr step
    # (measured 0.58 lr after 3 steps on one CPU, under 0.5 on another; 3 steps can move a weight by 3 lr)
    a, b = accumulated.student_unet.state_dict(), big.student_unet.state_dict()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1.0 * ca.lr


def test_accumulated_resume_is_bit_exact(micro_teacher, data, tmp_path):
    cfg = _cfg(max_steps=2, gradient_accumulation=2, mixed_precision="bf16")
    full = _task(micro_teacher, data)
    assert fit(full, cfg, tmp_path / "a") == 2
    assert fit(_task(micro_teacher, data), LoopConfig(**{**cfg.__dict__, "max_minutes": 1e-9}), tmp_path / "b") == 1
    resumed = _task(micro_teacher, data)
    assert fit(resumed, cfg, tmp_path / "b", resume=True) == 2
    for name in ("student_unet", "target_unet"):
        a, b = getattr(full, name).state_dict(), getattr(resumed, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="gradient-accumulation 2"):
        fit(_task(micro_teacher, data), LoopConfig(**{**cfg.__dict__, "gradient_accumulation": 1, "max_steps": 3}),
            tmp_path / "b", resume=True)


def _bnb_works() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:
        return False
    return True


def test_adamw8bit_without_bitsandbytes_is_one_clear_error(micro_teacher, data, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    with pytest.raises(ValueError, match="needs bitsandbytes") as err:
        prepare(_task(micro_teacher, data), _cfg(optimizer="adamw8bit"), make_accelerator())
    assert "\n" not in str(err.value)


def test_adamw8bit_trains_and_resumes_or_says_why_not(micro_teacher, data, tmp_path):
    assert _bnb_works(), "bitsandbytes is in the test extra (pyproject.toml)"
    cfg = _cfg(max_steps=2, optimizer="adamw8bit", mixed_precision="bf16")
    try:
        opt = prepare(_task(micro_teacher, data), cfg, make_accelerator())
    except ValueError as exc:  # this bitsandbytes build has no 8-bit AdamW for this device
        assert "does not run on" in str(exc) and "\n" not in str(exc)
        pytest.skip(f"bitsandbytes' 8-bit AdamW cannot run here: {exc}")
    assert "8bit" in type(getattr(opt, "optimizer", opt)).__name__
    full = _task(micro_teacher, data)
    assert fit(full, cfg, tmp_path / "a") == 2
    fit(_task(micro_teacher, data), LoopConfig(**{**cfg.__dict__, "max_minutes": 1e-9}), tmp_path / "b")
    resumed = _task(micro_teacher, data)
    assert fit(resumed, cfg, tmp_path / "b", resume=True) == 2
    a, b = full.student_unet.state_dict(), resumed.student_unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.isfinite(v).all() for v in a.values())


class _NestedAdamW(torch.optim.AdamW):
    """An AdamW whose state dict nests its moments one dict deep, as bitsandbytes' 8-bit optimizers do."""

    def state_dict(self):
        sd = super().state_dict()
        return {**sd, "state": {pid: {"step": st["step"], "moments": {"m": st["exp_avg"], "v": st["exp_avg_sq"]}}
                                for pid, st in sd["state"].items()}}

    def load_state_dict(self, state_dict):
        state = {pid: {"step": st["step"], "exp_avg": st["moments"]["m"], "exp_avg_sq": st["moments"]["v"]}
                 for pid, st in state_dict["state"].items()}
        super().load_state_dict({**state_dict, "state": state})


def test_8bit_state_is_flat_in_a_checkpoint_and_restored_exactly(tmp_path):
    """What the 8-bit optimizer adds to checkpoints and resume, without bitsandbytes: a nested state is stored
    one tensor per (parameter, key) and loads back to the same optimizer state."""
    from latentcm.training.checkpoint import load_checkpoint, save_checkpoint
    from latentcm.training.optim8bit import _flat_state

    flat_adamw = _flat_state(_NestedAdamW)
    assert flat_adamw.__name__ == "_NestedAdamW"
    net = torch.nn.Linear(3, 2)
    opt = flat_adamw(net.parameters(), lr=1e-2)
    for _ in range(2):
        net(torch.ones(1, 3)).sum().backward()
        opt.step()
    flat = opt.state_dict()["state"][0]
    assert set(flat) == {"step", "moments/m", "moments/v"} and all(torch.is_tensor(v) for v in flat.values())
    save_checkpoint(tmp_path / "step-0000002.safetensors", {"net": net}, opt, {"step": 2})
    net2 = torch.nn.Linear(3, 2)
    opt2 = flat_adamw(net2.parameters(), lr=1e-2)
    load_checkpoint(tmp_path / "step-0000002.safetensors", {"net": net2}, opt2)
    a, b = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert a.keys() == b.keys() and all(torch.equal(a[p][k].float(), b[p][k].float()) for p in a for k in a[p])
    for n, o in ((net, opt), (net2, opt2)):  # and the next update is the same
        o.zero_grad()
        n(torch.ones(1, 3)).sum().backward()
        o.step()
    assert torch.equal(net.weight, net2.weight) and torch.equal(net.bias, net2.bias)


def test_adamw8bit_that_cannot_run_on_the_device_is_one_clear_error(monkeypatch):
    """The probe of a bitsandbytes build without a CPU 8-bit AdamW, with a stand-in module."""
    import types

    from latentcm.training.optim8bit import adamw8bit

    class Broken(torch.optim.AdamW):
        def step(self, closure=None):
            raise RuntimeError("no CPU kernel\nsecond line")
    fake = types.ModuleType("bitsandbytes")
    fake.optim = types.SimpleNamespace(AdamW8bit=Broken)
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    with pytest.raises(ValueError, match="does not run on cpu here") as err:
        adamw8bit([torch.nn.Parameter(torch.zeros(3))], _cfg(optimizer="adamw8bit"), None)
    assert "\n" not in str(err.value) and "no CPU kernel" in str(err.value)


def test_bad_loop_options_are_refused():
    for bad in ({"mixed_precision": "fp8"}, {"gradient_accumulation": 0}, {"optimizer": "sgd"}):
        with pytest.raises(ValueError):
            _cfg(**bad)


def test_cli_adamw8bit_without_bitsandbytes_is_one_error_line(micro_teacher, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    from latentcm.cli import main

    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        main(["distill", "--teacher", str(micro_teacher), "--out", str(out), "--max-steps", "1", "--batch-size",
              "1", "--num-data", "2", "--validate-every", "0", "--mixed-precision", "bf16",
              "--gradient-accumulation", "2", "--optimizer", "adamw8bit"])
    assert exit_.value.code != 0 and "adamw8bit" in capsys.readouterr().err


@pytest.mark.parametrize("lora", [False, True])
def test_cli_bf16_distill_runs_previews_and_exports(micro_teacher, tmp_path, lora):
    from latentcm.cli import main

    out = tmp_path / "run"
    main(["distill", "--teacher", str(micro_teacher), "--out", str(out), "--max-steps", "2", "--batch-size", "1",
          "--num-data", "2", "--validate-every", "1", "--mixed-precision", "bf16", "--gradient-accumulation", "2",
          *(["--lora", "4"] if lora else [])])
    assert (out / "pytorch_lora_weights.safetensors").is_file() if lora else (out / "unet").is_dir()
    assert list((out / "previews").glob("*.png"))


CONFIGS = ["single_gpu", "multi_gpu_8", "multi_node_2x8", "fsdp", "deepspeed_zero2"]


@pytest.mark.parametrize("name", CONFIGS)
def test_accelerate_configs_parse_and_have_the_keys(name):
    path = ROOT / "configs" / f"{name}.yaml"
    text = path.read_text()
    cfg = yaml.safe_load(text)
    for key in ("compute_environment", "distributed_type", "num_processes", "mixed_precision"):
        assert key in cfg, (name, key)
    assert cfg["compute_environment"] == "LOCAL_MACHINE"
    assert cfg["mixed_precision"] in ("no", "bf16", "fp16")
    assert f"accelerate launch --config_file configs/{name}.yaml -m latentcm.cli distill" in text
    assert int(cfg["num_processes"]) == int(cfg.get("num_machines", 1)) * (1 if name == "single_gpu" else 8)

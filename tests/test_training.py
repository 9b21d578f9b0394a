import torch
from safetensors.torch import load_file

from latentcm.teacher_build import stages as build
from latentcm.training.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from latentcm.training.loop import LoopConfig, fit, lr_at
from latentcm.teacher_build.tasks import VAETask, compatibility
from latentcm.training.data.shapes import WorldData
from latentcm.models import components as C


def test_three_step_build_of_every_stage_on_cpu(tmp_path):
    from diffusers import StableDiffusionPipeline

    assert build.run_stages(tmp_path, list(build.STAGES), "micro", seed=0, resume=False)
    for stage in build.STAGES:
        assert (tmp_path / stage / "final" / "DONE").is_file()
        assert (tmp_path / stage / "metrics.csv").read_text().count("\n") == 4  # header + 3 steps
    dest = build.export_teacher(tmp_path)
    pipe = StableDiffusionPipeline.from_pretrained(dest, local_files_only=True)
    assert pipe.vae.config.scaling_factor > 0 and pipe.vae.config.scaling_factor != 1.0


def _vae_task(seed=0, steps=4):
    p = C.get_preset("micro")
    data = WorldData.make(0, 8)
    return VAETask(C.build_vae(p, seed), data, seed, batch_size=2, max_steps=steps)


def test_resume_matches_an_uninterrupted_run(tmp_path):
    cfg = LoopConfig(max_steps=4, lr=1e-3, warmup=1, checkpoint_every=1)
    full = _vae_task()
    fit(full, cfg, tmp_path / "a")
    part = _vae_task()
    fit(part, LoopConfig(**{**cfg.__dict__, "max_minutes": 1e-9}), tmp_path / "b")  # stops after 1 step
    assert [int(p.stem.split("-")[1]) for p in list_checkpoints(tmp_path / "b" / "checkpoints")] == [1]
    resumed = _vae_task()
    assert fit(resumed, cfg, tmp_path / "b", resume=True) == 4
    for a, b in zip(full.vae.state_dict().values(), resumed.vae.state_dict().values()):
        assert torch.equal(a, b)
    last_a = load_file(str(list_checkpoints(tmp_path / "a" / "checkpoints")[-1]))
    last_b = load_file(str(list_checkpoints(tmp_path / "b" / "checkpoints")[-1]))
    assert last_a.keys() == last_b.keys() and any(k.startswith("optim.") for k in last_a)
    assert all(torch.equal(last_a[k], last_b[k]) for k in last_a)


def test_fit_refuses_to_overwrite_without_resume(tmp_path):
    cfg = LoopConfig(max_steps=1, warmup=1, checkpoint_every=1)
    fit(_vae_task(), cfg, tmp_path)
    try:
        fit(_vae_task(), cfg, tmp_path)
    except FileExistsError as exc:
        assert "--resume" in str(exc)
    else:
        raise AssertionError("expected FileExistsError")


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    m = torch.nn.Linear(2, 2)
    path = save_checkpoint(tmp_path / "step-0000001.safetensors", {"m": m}, None, {"step": 1})
    before = path.read_bytes()
    import latentcm.training.checkpoint as ck

    def boom(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(ck, "save_file", boom)
    try:
        save_checkpoint(path, {"m": torch.nn.Linear(2, 2)}, None, {"step": 1})
    except RuntimeError:
        pass
    assert path.read_bytes() == before
    m2 = torch.nn.Linear(2, 2)
    assert load_checkpoint(path, {"m": m2}, None)["step"] == 1
    assert torch.equal(m2.weight, m.weight)


def test_lr_schedule_warms_up_then_decays():
    cfg = LoopConfig(max_steps=100, lr=1.0, warmup=10, min_lr_ratio=0.1)
    assert lr_at(cfg, 0) == 0.1 and lr_at(cfg, 9) == 1.0
    assert abs(lr_at(cfg, 100) - 0.1) < 1e-9 and lr_at(cfg, 50) < 1.0


def test_clip_positives_follow_the_caption_attributes():
    data = WorldData.make(0, 4)
    s = data.scenes
    pos = compatibility(s, [f"a {s[0].colour} {s[0].shape}", "a ring"])
    assert pos[0, 0] == 1
    assert pos[:, 1].tolist() == [float(x.shape == "ring") for x in s]

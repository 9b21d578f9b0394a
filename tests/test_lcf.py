"""Latent Consistency Fine-tuning: the striped set, user folders, the same-noise target, the CLI."""
import json

import numpy as np
import pytest
import torch

from latentcm import schedules, styles, world
from latentcm.cli import main
from latentcm.training.data.folders import fit_square, load_pairs
from latentcm.bundle import Bundle
from latentcm.training.consistency import LCDConfig, LCDTask
from latentcm.training.data.tensors import encode_pairs


def test_striped_set_is_deterministic_captioned_and_striped():
    a, b = styles.make_styled_sample(0, 5), styles.make_styled_sample(0, 5)
    assert a.text == b.text and np.array_equal(np.asarray(a.image), np.asarray(b.image))
    texts = [styles.make_styled_sample(0, i).text for i in range(200)]
    assert all(styles.has_style(t) for t in texts)
    for i, t in enumerate(texts):
        s = styles.make_styled_sample(0, i)
        parsed = world.parse_caption(t)
        assert all(parsed[k] == v for k, v in s.scene.attributes().items() if k in parsed), t
    # the object carries two colours (bands); the plain render has one
    s = styles.make_styled_sample(0, 1)
    plain, striped = np.asarray(world.render(s.scene)), np.asarray(s.image)
    changed = np.any(plain != striped, axis=-1)
    assert changed.sum() > 20 and np.all(plain[~changed] == striped[~changed])
    assert styles.make_styled_sample(0, 1, "heldout").text != s.text
    with pytest.raises(ValueError, match="unknown split"):
        styles.make_styled_sample(0, 1, "paraphrase")


def _folder(tmp_path):
    """3 good images in metadata.jsonl, a sidecar-captioned one, a corrupt one, a caption-less one."""
    d = tmp_path / "data"
    d.mkdir()
    rows = []
    for i in range(3):
        s = world.make_sample(0, i)
        s.image.save(d / f"ok{i}.png")
        rows.append(json.dumps({"file_name": f"ok{i}.png", "text": s.text}))
    world.make_sample(0, 3).image.resize((96, 64)).save(d / "wide.jpg")
    (d / "wide.txt").write_text("a red circle\n")
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    rows.append(json.dumps({"file_name": "broken.png", "text": "a blue square"}))
    world.make_sample(0, 4).image.save(d / "nocaption.png")
    rows.append("{not json")
    rows.append(json.dumps({"file_name": "gone.png", "text": "a star"}))
    (d / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return d


def test_user_folder_skips_and_reports_bad_files(tmp_path):
    pairs, report = load_pairs(_folder(tmp_path), 64)
    assert len(pairs) == report.loaded == 4 and all(im.size == (64, 64) for im, _ in pairs)
    assert "a red circle" in [t for _, t in pairs]
    assert report.skipped == {"unreadable image": ["broken.png"], "missing caption": ["nocaption.png"],
                              "bad metadata line": ["metadata.jsonl:5"], "listed file missing": ["gone.png"]}
    assert report.summary().startswith("loaded 4 image-caption pairs; skipped 4 (")
    assert fit_square(world.make_sample(0, 0).image.resize((128, 64)), 32).size == (32, 32)


@pytest.fixture(scope="module")
def lcm_bundle(micro_lcm):
    return Bundle.load(micro_lcm)


def test_lcf_target_uses_the_same_latent_and_noise_for_both_points(lcm_bundle):
    pairs = [(s.image, s.text) for s in world.iter_samples(0, 4)]
    data = encode_pairs(lcm_bundle.vae, lcm_bundle.text_encoder, lcm_bundle.tokenizer, pairs)
    task = LCDTask(None, lcm_bundle.scheduler_config, data, LCDConfig(batch_size=3, target="same-noise"),
                   student=lcm_bundle.unet)
    seen = {}
    student_fwd, target_fwd = task.student.forward, task.target.forward
    task.student.forward = lambda z, t, *a, **k: (seen.setdefault("online", (z, t)), student_fwd(z, t, *a, **k))[1]
    task.target.forward = lambda z, t, *a, **k: (seen.setdefault("target", (z, t)), target_fwd(z, t, *a, **k))[1]
    batch = task.batch(0)
    task.loss(batch, 0)
    (z_s, t_s), (z_n, t_n) = seen["online"], seen["target"]
    assert torch.all(t_n == (t_s - task.cfg.skip).clamp(min=0)) and not torch.equal(z_s, z_n)

    def noise_of(z_t, t):  # eps = (z_t - alpha(t) z0) / sigma(t)
        a = task.alpha_bar[t].float().sqrt().view(-1, 1, 1, 1)
        return (z_t - a * batch["z0"]) / (1 - a ** 2).sqrt()
    torch.testing.assert_close(noise_of(z_s, t_s), batch["noise"], atol=1e-4, rtol=0)
    torch.testing.assert_close(noise_of(z_n, t_n), batch["noise"], atol=1e-4, rtol=0)
    torch.testing.assert_close(z_n, schedules.add_noise(batch["z0"], batch["noise"], task.alpha_bar[t_n]))


def test_max_timestep_draws_only_low_noise_points(lcm_bundle):
    data = encode_pairs(lcm_bundle.vae, lcm_bundle.text_encoder, lcm_bundle.tokenizer,
                        [(s.image, s.text) for s in world.iter_samples(0, 2)])
    cfg = LCDConfig(batch_size=64, target="same-noise", skip=100, max_timestep=499)
    task = LCDTask(None, lcm_bundle.scheduler_config, data, cfg, student=lcm_bundle.unet)
    assert task.grid.tolist() == [99, 199, 299, 399, 499]
    drawn = torch.cat([task.batch(step)["t_start"] for step in range(4)])
    assert drawn.max() <= 499 and set(drawn.tolist()) == {99, 199, 299, 399, 499}
    full = LCDTask(None, lcm_bundle.scheduler_config, data, LCDConfig(batch_size=64, target="same-noise", skip=100),
                   student=lcm_bundle.unet)
    assert torch.cat([full.batch(step)["t_start"] for step in range(4)]).max() > 499
    with pytest.raises(ValueError, match="leaves no grid point"):
        LCDConfig(skip=20, max_timestep=5)


def test_lcf_takes_no_teacher_and_lcd_needs_one(lcm_bundle, micro_teacher):
    data = encode_pairs(lcm_bundle.vae, lcm_bundle.text_encoder, lcm_bundle.tokenizer,
                        [(s.image, s.text) for s in world.iter_samples(0, 2)])
    teacher = Bundle.load(micro_teacher).unet
    with pytest.raises(ValueError, match="takes none"):
        LCDTask(teacher, lcm_bundle.scheduler_config, data, LCDConfig(target="same-noise"), student=lcm_bundle.unet)
    with pytest.raises(ValueError, match="needs a teacher"):
        LCDTask(None, lcm_bundle.scheduler_config, data, LCDConfig(), student=lcm_bundle.unet)


def test_finetune_cli_runs_reports_skips_and_exports_an_lcm(micro_lcm, micro_teacher, tmp_path, capsys):
    from diffusers import LatentConsistencyModelPipeline

    out = tmp_path / "lcf"
    main(["finetune", "--model", str(micro_lcm), "--data", str(_folder(tmp_path)), "--out", str(out),
          "--max-steps", "2", "--batch-size", "2", "--validate-every", "0", "--lr", "1e-3"])
    printed = capsys.readouterr().out
    assert "loaded 4 image-caption pairs; skipped 4" in printed and "unreadable image: broken.png" in printed
    pipe = LatentConsistencyModelPipeline.from_pretrained(out, local_files_only=True)
    assert pipe.unet.config.time_cond_proj_dim is not None
    assert pipe.scheduler.config.original_inference_steps == 50
    card = (out / "README.md").read_text()
    assert "fine-tuned from" in card and "lcm finetune --model" in card and "same-noise" in card
    before = Bundle.load(micro_lcm).unet.state_dict()
    after = pipe.unet.state_dict()
    assert any(not torch.equal(before[k], after[k].float()) for k in before)
    with pytest.raises(SystemExit) as exc:  # a teacher is not an LCM
        main(["finetune", "--model", str(micro_teacher), "--data", str(tmp_path / "data"), "--out",
              str(tmp_path / "x")])
    assert exc.value.code == 2 and "LCF fine-tunes an LCM" in capsys.readouterr().err


def test_finetune_on_a_folder_with_nothing_usable_is_one_line(micro_lcm, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.png").write_bytes(b"junk")
    with pytest.raises(SystemExit) as exc:
        main(["finetune", "--model", str(micro_lcm), "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "no usable image-caption pairs" in err


def test_fine_tune_then_distil_baseline_runs_on_a_folder(micro_teacher, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    data = _folder(tmp_path)
    main(["finetune-teacher", "--teacher", str(micro_teacher), "--data", str(data), "--out", str(tmp_path / "t"),
          "--max-steps", "2", "--batch-size", "2", "--lr", "1e-3"])
    assert "loaded 4 image-caption pairs" in capsys.readouterr().out
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "t", local_files_only=True)
    before, after = Bundle.load(micro_teacher).unet.state_dict(), pipe.unet.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    main(["distill", "--teacher", str(tmp_path / "t"), "--data", str(data), "--out", str(tmp_path / "l"),
          "--max-steps", "1", "--batch-size", "2", "--validate-every", "0"])
    assert Bundle.load(tmp_path / "l").is_lcm

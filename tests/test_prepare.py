"""Latent shards (``lcm prepare``): what they hold equals on-the-fly encoding, the split over processes and the
resume are exact, and bad latent shards are skipped and counted or refused in one line."""
import io
import json
import tarfile

import pytest
import torch
from PIL import Image

from latentcm.cli import main
from latentcm.training.data import prepare as prep
from latentcm.training.data.latent_format import read_tensors
from latentcm.training.data.shards import ShardSource

SPEC = "{000000..000003}.tar"


def _prepare(bundle, shards, out, rank=0, world=1, **cfg):
    cfg = prep.PrepareConfig(**{"dtype": "float32", **cfg})
    return prep.prepare(bundle, str(shards / SPEC), out, cfg, process_index=rank, num_processes=world)


@pytest.fixture(scope="module")
def latents(micro_bundle, world_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("latent-shards")
    _prepare(micro_bundle, world_shards, out)
    return out


def _bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("0*"))}


def test_latent_batches_equal_encoding_the_image_shards(micro_bundle, world_shards, latents):
    images = ShardSource(micro_bundle, str(world_shards / SPEC), 3, seed=5)
    stored = ShardSource(micro_bundle, str(latents / SPEC), 3, seed=5)
    assert stored.meta is not None and not stored.needs_encoders and images.needs_encoders
    assert stored.latent_shape == images.latent_shape
    assert torch.allclose(stored.uncond_states, images.uncond_states, atol=1e-6)
    for k in (0, 4, 1):  # forward, and back again (a restart)
        a, b = images.batch(k), stored.batch(k)
        # encoded in batches of 64 here, of 3 there: float sums reorder (oneDNN picks kernels by batch size)
        for x, y in ((a.latents, b.latents), (a.text_states, b.text_states)):
            assert x.shape == y.shape and float((x - y).abs().max() / x.abs().max()) < 1e-3, k


def test_caption_mode_encodes_the_stored_captions_per_batch(micro_bundle, world_shards, latents, tmp_path):
    _prepare(micro_bundle, world_shards, tmp_path, text="captions")
    member = next(n for n in tarfile.open(tmp_path / "000000.tar").getnames() if n.endswith(".latent.safetensors"))
    payload = tarfile.open(tmp_path / "000000.tar").extractfile(member).read()
    assert set(read_tensors(payload)) == {"latent"}  # no text states stored
    a = ShardSource(micro_bundle, str(latents / SPEC), 4, seed=1).batch(2)
    b = ShardSource(micro_bundle, str(tmp_path / SPEC), 4, seed=1)
    assert b.needs_encoders
    b = b.batch(2)
    assert torch.equal(a.latents, b.latents) and torch.allclose(a.text_states, b.text_states, atol=1e-5)


def test_two_processes_write_exactly_what_one_writes(micro_bundle, world_shards, latents, tmp_path):
    for rank in (1, 0):
        done = _prepare(micro_bundle, world_shards, tmp_path, rank=rank, world=2)
        assert done["done"] == 2 and done["units"] == 4
    assert _bytes(tmp_path) == _bytes(latents)


def _assert_same_shards(a_dir, b_dir):
    """Same shards, members and captions; tensors equal up to float reordering (the launched processes run one
    torch thread each, this process may run two)."""
    for name in ("000000.tar", "000001.tar", "000002.tar", "000003.tar"):
        with tarfile.open(a_dir / name) as ta, tarfile.open(b_dir / name) as tb:
            assert ta.getnames() == tb.getnames()
            for m in ta.getnames():
                x, y = ta.extractfile(m).read(), tb.extractfile(m).read()
                if not m.endswith(".safetensors"):
                    assert x == y, m
                    continue
                for key, t in read_tensors(x).items():
                    u = read_tensors(y)[key]
                    assert float((t - u).abs().max()) <= 1e-5 * float(t.abs().max()) + 1e-7, (m, key)


def test_an_interrupted_prepare_resumes_to_the_same_shards(micro_bundle, world_shards, latents, tmp_path):
    _prepare(micro_bundle, world_shards, tmp_path)
    (tmp_path / "000002.tar").unlink()  # killed while writing shard 2: no final file, a partial temp file
    (tmp_path / "000002.tar.tmp").write_bytes(b"partial")
    done = _prepare(micro_bundle, world_shards, tmp_path)
    assert done == {"done": 1, "skipped_existing": 3, "units": 4}
    assert not list(tmp_path.glob("*.tmp")) and _bytes(tmp_path) == _bytes(latents)
    assert prep.summarize(tmp_path, 4)["loaded"] == 16


def test_float16_storage_is_half_the_payload_and_close(micro_bundle, world_shards, latents, tmp_path):
    _prepare(micro_bundle, world_shards, tmp_path, dtype="float16")
    a = ShardSource(micro_bundle, str(latents / SPEC), 4).batch(0)
    b = ShardSource(micro_bundle, str(tmp_path / SPEC), 4).batch(0)
    assert b.latents.dtype == torch.float32  # read back in fp32
    assert torch.allclose(a.latents, b.latents, rtol=2e-3, atol=2e-3)
    assert (tmp_path / "000000.tar").stat().st_size < (latents / "000000.tar").stat().st_size


def test_a_folder_prepares_in_chunks_and_counts_bad_images(micro_bundle, tmp_path):
    folder = tmp_path / "folder"
    main(["world", "export", str(folder), "--count", "5"])
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "broken.txt").write_text("a red circle")
    Image.new("RGB", (8, 8)).save(folder / "uncaptioned.png")  # listed by no caption at all
    out = tmp_path / "lat"
    done = prep.prepare(micro_bundle, folder, out, prep.PrepareConfig(shard_size=2))
    assert done["units"] == 3
    summary = prep.summarize(out, 3)
    assert summary["loaded"] == 5 and summary["skipped"] == {"unreadable image": 1, "missing caption": 1}
    source = ShardSource(micro_bundle, str(out / "{000000..000002}.tar"), 2)
    assert len(source.batch(0)) == 2


def _rewrite(src, dst, change):
    """Copy a tar member by member, ``change(name, data)`` -> new data (None drops the member)."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for m in tin:
            data = change(m.name, tin.extractfile(m).read())
            if data is not None:
                info = tarfile.TarInfo(m.name)
                info.size = len(data)
                tout.addfile(info, io.BytesIO(data))
    return dst


def test_a_corrupt_latent_payload_is_skipped_and_counted(micro_bundle, latents, tmp_path):
    first = [True]

    def corrupt(name, data):
        if name.endswith(".latent.safetensors") and first[0]:
            first[0] = False
            return b"\x00garbage"
        return data
    bad = _rewrite(latents / "000000.tar", tmp_path / "bad.tar", corrupt)
    source = ShardSource(micro_bundle, str(bad), 4)
    assert len(source.batch(0)) == 3  # the fourth sample's payload is unreadable
    assert source.report.skipped == {"unreadable latent": [next(iter(source._late))]}


def test_latents_of_another_resolution_or_without_meta_are_one_line_errors(micro_teacher, latents, tmp_path, capsys):
    def other_resolution(name, data):
        if name == "__meta__.json":
            meta = json.loads(data)
            meta["resolution"] *= 2
            return json.dumps(meta).encode()
        return data
    cases = [_rewrite(latents / "000000.tar", tmp_path / "res.tar", other_resolution),
             _rewrite(latents / "000000.tar", tmp_path / "nometa.tar",
                      lambda name, data: None if name.startswith("__meta__") else data)]
    for bad, words in zip(cases, ("prepared at", "without a __meta__")):
        with pytest.raises(SystemExit) as exc:
            main(["distill", "--teacher", str(micro_teacher), "--out", str(tmp_path / "run"), "--data", str(bad),
                  "--max-steps", "1", "--batch-size", "2", "--validate-every", "0"])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.startswith("lcm: error:") and err.count("\n") == 1 and words in err, err
        assert not (tmp_path / "run").exists()


def test_bad_prepare_options_are_refused():
    for bad in ({"text": "pixels"}, {"dtype": "int8"}, {"shard_size": 0}):
        with pytest.raises(ValueError):
            prep.PrepareConfig(**bad)


def test_accelerate_launch_with_two_processes_writes_the_one_process_shards(latents, two_process_runs):
    """`lcm prepare --dtype float32` of the 4 world shards under `accelerate launch` with 2 CPU processes (the
    "prepare" job of tests/multiprocess_jobs.py)."""
    proc, root = two_process_runs
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = [(root / f"prepare-stdout-{r}.txt").read_text() for r in (0, 1)]
    assert printed[0].startswith("16 samples in 4 latent shards")  # the summary, printed once (main process)
    assert "".join(printed).count("16 samples in") == 1
    _assert_same_shards(root / "prepare", latents)


def test_a_shard_prepare_found_nothing_in_is_read_past(micro_bundle, latents, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "broken.txt").write_text("a red circle")
    prep.prepare(micro_bundle, folder, tmp_path / "empty", prep.PrepareConfig())
    assert prep.summarize(tmp_path / "empty", 1)["loaded"] == 0
    source = ShardSource(micro_bundle, f"{tmp_path / 'empty' / '000000.tar'}::{latents / '000000.tar'}", 2)
    assert len(source.batch(0)) == 2 and source.meta["latent_shape"]

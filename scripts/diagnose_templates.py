"""Judge accuracy of a teacher per caption-template family, on held-out attribute triples.

    python scripts/diagnose_templates.py [--model teacher] [--per-template 48] > reports/teacher/templates.txt

Separates the two kinds of generalisation the held-out split mixes: new attribute combinations
(held-out triples in *training* templates) and new word orders (each held-out template alone).
DPM-Solver++ 20 steps, guidance 7.5, seeds 0..N-1.
"""
import argparse
import random

from latentcm import registry, world
from latentcm.evaluation.judge_eval import attribute_accuracy
from latentcm.bundle import Bundle
from latentcm.models.judge import Judge


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="teacher")
    ap.add_argument("--per-template", type=int, default=48)
    args = ap.parse_args()
    bundle, judge = Bundle.load(registry.resolve(args.model)), Judge.load(registry.resolve("judge"))
    rng = random.Random(5)
    families = [("all training templates", world.TRAIN_TEMPLATES)]
    families += [(f"held-out: {t}", (t,)) for t in world.HELDOUT_TEMPLATES]
    families += [(f"paraphrase: {t}", (t,)) for t in world.PARAPHRASE_TEMPLATES]
    print("| captions (held-out triples) | colour | background | shape | size | position |")
    print("|---|---|---|---|---|---|")
    for name, templates in families:
        scenes = [world.sample_scene(rng, "heldout") for _ in range(args.per_template)]
        prompts = [world.caption(s, rng, templates) for s in scenes]
        images = bundle.generate(prompts, list(range(len(prompts))), "dpm-solver++", 20, 7.5)
        acc = attribute_accuracy(judge.predict(images), [world.parse_caption(p) for p in prompts])
        cells = [f"{100 * acc[k]:.0f}%" if k in acc else "-" for k in ("colour", "background", "shape", "size",
                                                                       "position")]
        print(f"| {name.replace('|', '/')} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

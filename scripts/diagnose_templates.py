"""Judge accuracy of a teacher per caption-template family, on held-out attribute triples.

    python scripts/diagnose_templates.py [--model teacher] [--per-template 48] > reports/teacher/templates.md

Separates the two kinds of generalisation the held-out split mixes: new attribute combinations
(held-out triples in *training* templates) and new word orders (each held-out template alone).
DPM-Solver++ 20 steps, the teacher's default guidance, seeds 0..N-1. Images are scored by the
evaluation pipeline's one scoring function (``scoring.score``), of which this prints the judge's
per-attribute accuracy.
"""
import argparse
import random

from latentcm import registry, world
from latentcm.bundle import Bundle
from latentcm.defaults import TEACHER_GUIDANCE
from latentcm.evaluation import references, scoring
from latentcm.evaluation.extractors import JudgeExtractor


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="teacher")
    ap.add_argument("--per-template", type=int, default=48)
    args = ap.parse_args()
    bundle, extractor = Bundle.load(registry.resolve(args.model)), JudgeExtractor.load(registry.resolve("judge"))
    reference = references.reference_set(extractor)
    rng = random.Random(5)
    families = [("all training templates", world.TRAIN_TEMPLATES)]
    families += [(f"held-out: {t}", (t,)) for t in world.HELDOUT_TEMPLATES]
    families += [(f"paraphrase: {t}", (t,)) for t in world.PARAPHRASE_TEMPLATES]
    print("| captions (held-out triples) | colour | background | shape | size | position |")
    print("|---|---|---|---|---|---|")
    for name, templates in families:
        scenes = [world.sample_scene(rng, "heldout") for _ in range(args.per_template)]
        prompts = [world.caption(s, rng, templates) for s in scenes]
        images = bundle.generate(prompts, list(range(len(prompts))), "dpm-solver++", 20, TEACHER_GUIDANCE)
        acc = scoring.score(images, prompts, extractor, reference)["attribute_accuracy"]
        cells = [f"{100 * acc[k]:.0f}%" if k in acc else "-" for k in ("colour", "background", "shape", "size",
                                                                       "position")]
        print(f"| {name.replace('|', '/')} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

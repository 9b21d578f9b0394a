"""Re-render a Table 1 folder (``lcm evaluate --preset table1``'s output) without sampling again.

    python scripts/table1_report.py reports/table1                     # table1.md and table1.png from results.json
    python scripts/table1_report.py runs/table1 --intervals [--bootstrap 1000] [--baseline lcm]

Without ``--intervals``: table1.md and table1.png are written again from results.json alone (results.json is
left as it is; what an older file holds is shown as it is). With ``--intervals``: every row's 95% sampling intervals and paired
differences to the baseline method are computed from the images ``lcm evaluate`` cached in FOLDER/samples (the
judge scores them again; no model is loaded, nothing is sampled) and written into results.json, table1.md and
table1.png (``pipeline.rescore``). A folder whose samples/ is gone (the committed reports keep only grids) needs
the ``lcm evaluate`` command in its README run again: it reuses whatever images are cached.
"""
import argparse
import sys
from pathlib import Path

from latentcm import registry
from latentcm.errors import one_line
from latentcm.evaluation import pipeline
from latentcm.evaluation.extractors import JudgeExtractor
from latentcm.evaluation.results import read_results

RESAMPLES = 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="A Table 1 folder holding results.json.")
    parser.add_argument("--intervals", action="store_true",
                        help="Compute the sampling intervals and paired differences from FOLDER/samples.")
    parser.add_argument("--bootstrap", type=int, default=RESAMPLES, help="Resamples of the intervals.")
    parser.add_argument("--baseline", default="lcm", help="Sampler of the method the rows are compared with.")
    parser.add_argument("--judge", default="judge", help="Judge folder or shipped name (with --intervals).")
    args = parser.parse_args(argv)
    if not (args.folder / "results.json").is_file():
        print(f"error: {args.folder / 'results.json'} does not exist", file=sys.stderr)
        return 2
    if args.bootstrap < 1:
        print(f"error: --bootstrap must be >= 1, got {args.bootstrap}", file=sys.stderr)
        return 2
    try:
        if args.intervals:
            extractor = JudgeExtractor.load(registry.resolve(args.judge))
            pipeline.rescore(args.folder, extractor, intervals=args.bootstrap, baseline=args.baseline)
        else:
            pipeline.write_table1(read_results(args.folder / "results.json"), args.folder, with_json=False)
    except (ValueError, OSError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    print(args.folder / "table1.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

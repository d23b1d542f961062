"""Command line of zaya-repro: run the notebook pipeline, or validate a params file.

    python -m zaya_lib run --params params/tiny.yaml [--only 03_pretraining 05] [--force] [--outputs outputs]
    python -m zaya_lib validate --params params/zaya1-8b.yaml
    python -m zaya_lib seeds --params params/tiny.yaml --seeds 0 1 2   (the seed study -> outputs/tiny-seeds/)
    zaya run --params params/smoke.yaml          (the same, as the installed console script)

Exit codes: 0 ok, 2 bad parameters (nothing was run or written), 1 a notebook failed, 130 interrupted.
"""
from __future__ import annotations

import argparse
import sys

from zaya_lib.pipeline.params import ParamsError

EXIT_OK, EXIT_FAILED, EXIT_BAD_PARAMS, EXIT_INTERRUPTED = 0, 1, 2, 130


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="zaya", description="zaya-repro: run the notebook pipeline headless.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="execute the numbered notebooks with a params profile (resumable)")
    run.add_argument("--params", required=True, help="params YAML, e.g. params/tiny.yaml")
    run.add_argument("--only", nargs="+", metavar="NOTEBOOK", help="run a subset: stems (03_pretraining) or numbers (03)")
    run.add_argument("--force", action="store_true", help="rerun notebooks even when up to date")
    run.add_argument("--outputs", default="outputs", help="outputs root; the run goes to OUTPUTS/<run_name> (default: outputs)")
    run.add_argument("--notebooks-dir", default=None, help="folder of NN_*.ipynb notebooks (default: the repo's notebooks/)")
    st = sub.add_parser("seeds", help="the whole pipeline once per seed, then every claim pooled over the seeds "
                                      "(resumable) -> OUTPUTS/<profile>-seeds/claims.md")
    st.add_argument("--params", required=True, help="params YAML, e.g. params/tiny.yaml")
    st.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    st.add_argument("--only", nargs="+", metavar="NOTEBOOK", help="run a subset of the notebooks in every seed")
    st.add_argument("--force", action="store_true", help="rerun notebooks even when up to date")
    st.add_argument("--outputs", default="outputs", help="outputs root (default: outputs)")
    st.add_argument("--collect-only", action="store_true", help="only (re)write the claims from finished runs")
    val = sub.add_parser("validate", help="check a params YAML against the notebooks' parameters; runs nothing")
    val.add_argument("--params", required=True)
    val.add_argument("--notebooks-dir", default=None)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from zaya_lib.pipeline import runner  # imports yaml and the pipeline modules only; papermill loads when a notebook runs

    try:
        if args.cmd == "validate":
            schema, data, run_dir, plans = runner.plan_run(args.params, notebooks_dir=args.notebooks_dir)
            set_keys = [k for k in data if k != "run_name"]
            print(f"{args.params}: OK ({len(set_keys)} key(s) set; run {data['run_name']!r} -> {run_dir}; "
                  f"notebooks: {', '.join(p.stem for p in plans) or 'none yet'})")
            return EXIT_OK
        if args.cmd == "seeds":
            from zaya_lib.pipeline import seeds

            if args.collect_only:
                out = seeds.study_dir(args.params, args.outputs)
                seeds.write_claims(out, seeds.collect_claims(out, args.seeds))
                print(f"claims -> {out / 'claims.md'}")
            else:
                seeds.run_seed_study(args.params, args.seeds, outputs_root=args.outputs, force=args.force,
                                     only=args.only)
            return EXIT_OK
        runner.run_pipeline(args.params, only=args.only, force=args.force, outputs_root=args.outputs,
                            notebooks_dir=args.notebooks_dir)
        return EXIT_OK
    except ParamsError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_PARAMS
    except runner.NotebookFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("\ninterrupted; rerun the same command to resume (finished notebooks are skipped)", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())

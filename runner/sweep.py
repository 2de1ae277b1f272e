"""``--bs 1,4,8``: one full run per batch size, with Ray and the workers started once.

Each run lands in ``OUT/bs{N}/`` with the files of a single run; the sweep adds
``OUT/summary.md``, ``summary.csv``, ``summary.json`` and ``throughput.png``
(``runner.report``) and prints the table. Workers switch batch size with
``Worker.set_batch``, which reopens a session only for a new model file (a static
OM per batch size; ``--om-batch dynamic`` makes one OM for all and only switches its
gear). ``--resume`` continues per batch size: finished ones are kept, the
interrupted one resumes from its journal, the rest run.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from runner.config import RunConfig
from runner.detect import plan_detection, run_planned_detection
from cluster.actor import Worker
from cluster.pool import actor_pool
from runner.control import session_for
from runner.driver import RunOutcome, run_batch
from runner.errors import RunError
from runner.inputs import choose_backend, load_inputs, settle_uint8_input
from runner.outputs import format_metrics, prepare_out
from runner.report import load_run, write_summary

SUMMARY_FILES = ("summary.md", "summary.csv", "summary.json", "throughput.png")


def run_dir(out: Path, bs: int) -> Path:
    return out / f"bs{bs}"


def run_sweep(cfg: RunConfig, log=print) -> list[RunOutcome]:
    if len(set(cfg.bs)) != len(cfg.bs):
        raise RunError(f"--bs {','.join(map(str, cfg.bs))}: a batch size is repeated")
    log = (lambda *a, **k: None) if cfg.quiet else log
    out = prepare_out(cfg)
    if cfg.overwrite and not cfg.resume:
        for name in SUMMARY_FILES:
            (out / name).unlink(missing_ok=True)
    plan = plan_detection(cfg, log)  # --dets FILE not there yet and --detector-weights: detect first
    inputs = None if plan else load_inputs(cfg)
    outcomes = []
    with session_for(cfg) as session:
        backend = choose_backend(cfg.backend, session.devices)
        cfg = settle_uint8_input(cfg, backend, session.devices)
        if plan:
            run_planned_detection(plan, session, cfg, backend, log)
            inputs = load_inputs(cfg)
        with actor_pool(session, Worker, backend, cfg.threads) as pool:
            # Every run gets the whole sweep's sizes: the gears of a dynamic-batch OM (--om-batch dynamic),
            # so each run opens the same model file and only selects its gear.
            gears = tuple(sorted(cfg.bs))
            for bs in cfg.bs:
                one = dataclasses.replace(cfg, bs=(bs,), om_gears=gears, out=str(run_dir(out, bs)))
                outcome = run_batch(one, session, pool, inputs, backend, bs, prepare_out(one), log,
                                    keep_finished=True)
                log(f"bs {bs}: {format_metrics(outcome.metrics).splitlines()[0]}, "
                    f"sum of device fps {outcome.throughput['totals']['sum_device_fps']:.1f}, "
                    f"e2e {outcome.throughput['totals']['e2e_boxes_per_s']:.1f} boxes/s")
                outcomes.append(outcome)
    table = write_summary(out, [load_run(run_dir(out, bs)) for bs in sorted(cfg.bs)])
    log(table)
    log(f"summary: {out / 'summary.md'}, {out / 'summary.csv'}, {out / 'summary.json'}, {out / 'throughput.png'}")
    return outcomes

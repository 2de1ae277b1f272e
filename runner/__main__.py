"""``python -m runner``: the command line. Errors a user can fix print one line, no traceback."""
from __future__ import annotations

import argparse
import sys

from runner.config import ConfigError, load_config



#: The errors a user can fix, by module. Only those of modules already imported are
#: looked up: a class whose module never loaded cannot have been raised, and importing
#: tasks.model or tasks.detector to name theirs would cost a failed command torch's import.
USER_ERRORS = (
    ("runner.config", "ConfigError"), ("runner.report", "ReportError"), ("cluster.devices", "DeviceError"),
    ("cluster.errors", "ClusterError"), ("cluster.npu_smi", "NpuSmiUnavailable"), ("runner.errors", "RunError"),
    ("runner.journal", "JournalMismatch"), ("tasks.backends.base", "BackendUnavailable"),
    ("tasks.dataset", "DataError"), ("tasks.dataset", "ImageError"), ("tasks.export", "ExportError"),
    ("tasks.model", "CheckpointError"), ("tasks.atc", "AtcError"), ("tasks.detector.darknet_cfg", "CfgError"),
    ("tasks.detector.darknet_weights", "WeightsError"), ("tasks.detector.preprocess", "ImageError"),
    ("tasks.evaluation", "EvaluatorError"),
)


def _user_errors() -> tuple[type[BaseException], ...]:
    return tuple(getattr(sys.modules[module], name) for module, name in USER_ERRORS if module in sys.modules)


def run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m runner",
        description="AlphaPose FastPose over a COCO set on every device you name: keypoints.json, "
                    "COCO mAP and a throughput table; --bs 1,4,8 sweeps. Other commands: doctor, report.")
    p.add_argument("--config", help="YAML file of RunConfig keys (defaults: configs/default.yaml)")
    data = p.add_argument_group("data")
    data.add_argument("--dataroot", help="COCO root holding val2017/ and annotations/")
    data.add_argument("--dets", help="person boxes: a COCO results JSON list (used unfiltered, in file order)")
    data.add_argument("--boxes", choices=["gt"], help="use ground-truth person boxes instead of --dets")
    data.add_argument("--ann", help="annotation file (default DATAROOT/annotations/person_keypoints_val2017.json)")
    data.add_argument("--skip-missing-images", action="store_true", default=None,
                      help="run without boxes whose image file is missing (mAP marked incomplete)")
    model = p.add_argument_group("model")
    model.add_argument("--weights", help="fast_res50_256x192.pth")
    model.add_argument("--detector-weights", help="yolov3-spp.weights: write a --dets FILE that does not exist "
                                                  "yet with the detector first, on the same devices")
    model.add_argument("--detector-cfg", help="yolov3-spp.cfg (default: beside --detector-weights)")
    model.add_argument("--synthetic", type=int, metavar="N",
                       help="N synthetic boxes and a seeded random FastPose: throughput only")
    model.add_argument("--seed", type=int)
    model.add_argument("--models-dir", help="cache of exported models (default: models)")
    run = p.add_argument_group("run")
    run.add_argument("--backend", choices=["auto", "torch", "onnxruntime", "openvino", "om", "sim"],
                     help="sim: a simulated device of --sim-rate crops/s (throughput only)")
    run.add_argument("--devices", help="0,1 (NPU ids) | all | cuda:0,1 | cpu | cpu:N")
    run.add_argument("--bs", help="batch size, or a comma-separated list for a sweep")
    run.add_argument("--no-flip", dest="flip", action="store_false", default=None, help="skip the flip test")
    run.add_argument("--fused-flip", action="store_true", default=None,
                     help="one device call runs each batch and its mirror and merges them (same keypoints)")
    run.add_argument("--uint8-input", action=argparse.BooleanOptionalAction, default=None,
                     help="send uint8 crops; the model normalises them (4x fewer bytes, same keypoints). "
                          "Default: on for onnxruntime and torch on cpu, off elsewhere")
    run.add_argument("--om-batch", choices=["static", "dynamic"],
                     help="--backend om: one static OM per batch size (default) or one dynamic-batch OM "
                          "whose gears are the batch sizes (one ATC conversion for a sweep)")
    run.add_argument("--soc-version", metavar="SOC",
                     help="ATC soc_version of the NPUs, e.g. Ascend310P3 (default: from npu-smi, or Ray on a cluster)")
    run.add_argument("--sim-rate", type=float, metavar="CROPS_PER_S",
                     help="speed of each --backend sim device, in network inputs per second (default 1000)")
    run.add_argument("--shard-size", type=int, help="boxes per shard (rounded up to whole batches)")
    run.add_argument("--threads", type=int, help="backend threads per worker (default: its share of cores)")
    run.add_argument("--prep-threads", type=int,
                     help="preprocessing threads per worker (default: sized to the host)")
    run.add_argument("--device-timeout", type=float, metavar="S",
                     help="a worker holding shards that returns nothing for S seconds is declared lost "
                          "(default: 10x the median shard time, at least 300; 0: never)")
    run.add_argument("--straggler-factor", type=float, metavar="K",
                     help="when the queue is empty, a shard in flight for K median shard times also runs on an "
                          "idle worker; the first result wins (default 3; 0: never)")
    run.add_argument("--straggler-floor", type=float, metavar="S",
                     help="... and for at least S seconds (default 10)")
    run.add_argument("--check-backend", choices=["torch", "onnxruntime", "openvino"],
                     help="also run the first --check-boxes boxes through this backend on the CPU (torch: the "
                          "checkpoint itself) and write OUT/parity.json, box by box, with a verdict")
    run.add_argument("--check-boxes", type=int, metavar="N", help="boxes of the parity check (default 64)")
    run.add_argument("--evaluator", choices=["auto", "faster-coco-eval", "pycocotools"],
                     help="COCOeval implementation (default auto: faster-coco-eval where installed)")
    run.add_argument("--address", help="join a Ray cluster: auto or HOST:PORT")
    run.add_argument("--out", help="output directory (default: out)")
    run.add_argument("--resume", action="store_true", default=None, help="continue an interrupted run in OUT")
    run.add_argument("--overwrite", action="store_true", default=None, help="replace the results in OUT")
    run.add_argument("--dump-heatmaps", action="store_true", default=None,
                     help="workers also write the merged heatmaps to OUT/heatmaps")
    run.add_argument("--quiet", action="store_true", default=None)
    return p


def main_run(argv: list[str]) -> int:
    from runner.driver import run

    args = vars(run_parser().parse_args(argv))
    config_file = args.pop("config")
    args["dataroot"], args["models_dir"] = args.pop("dataroot"), args.pop("models_dir")
    run(load_config(config_file, args))
    return 0


def main_bench(argv: list[str]) -> int:
    from runner.bench import bench, bench_parser

    args, rest = bench_parser().parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        bench_parser().print_help()
        return 0
    run_args = vars(run_parser().parse_args(rest))
    config_file = run_args.pop("config")
    run_args["out"] = run_args["out"] or "bench-out"
    if not any(run_args.get(k) for k in ("dataroot", "dets", "boxes", "synthetic")):
        run_args["synthetic"] = 256
    bench(load_config(config_file, run_args), args)
    return 0


def main_doctor(argv: list[str]) -> int:
    from runner.doctor import doctor, format_doctor

    argparse.ArgumentParser(prog="python -m runner doctor",
                            description="What a run needs on this host, each ok or missing with the fix.").parse_args(argv)
    checks = doctor()
    print(format_doctor(checks))
    return 0


def main_report(argv: list[str]) -> int:
    from runner.report import report

    p = argparse.ArgumentParser(prog="python -m runner report",
                                description="Re-render the tables and throughput.png of saved runs (run or sweep "
                                            "directories) and compare each further one with the first, per batch "
                                            "size: mAP difference and throughput ratios.")
    p.add_argument("dirs", nargs="+", metavar="OUT", help="a run's or a sweep's output directory")
    report(p.parse_args(argv).dirs)
    return 0


def main_detect(argv: list[str]) -> int:
    from runner.detect import main_detect as detect

    return detect(argv)


COMMANDS = {"doctor": main_doctor, "report": main_report, "detect": main_detect, "bench": main_bench}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = COMMANDS.get(argv[0]) if argv else None
    from runner.errors import Interrupted

    try:
        return command(argv[1:]) if command else main_run(argv)
    except Interrupted as e:  # Ctrl-C: the journal is kept, --resume continues
        print(f"error: {e}", file=sys.stderr)
        return 130
    except _user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

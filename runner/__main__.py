"""``python -m runner``: the command line. Errors a user can fix print one line, no traceback."""
from __future__ import annotations

import argparse
import sys

from runner.config import load_config
from runner.errors import Interrupted
from tasks.errors import UserError


def run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m runner",
        description="AlphaPose FastPose over a COCO set on every device you name: keypoints.json, "
                    "COCO mAP, a throughput table and report.html; --bs 1,4,8 sweeps. Other commands: doctor, "
                    "report, show, detect, bench.")
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
    run.add_argument("--allow-opencv-mismatch", action="store_true", default=None,
                     help="run although this OpenCV's warpAffine differs from the pose crop's fixed-point rule "
                          "(each worker checks at start; run.json records what it found)")
    run.add_argument("--om-batch", choices=["static", "dynamic"],
                     help="--backend om: one static OM per batch size (default) or one dynamic-batch OM "
                          "whose gears are the batch sizes (one ATC conversion for a sweep)")
    run.add_argument("--soc-version", metavar="SOC",
                     help="ATC soc_version of the NPUs, e.g. Ascend310P3 (default: from npu-smi, or Ray on a cluster)")
    run.add_argument("--precision-mode", metavar="MODE",
                     help="--backend om: ATC's --precision_mode (default force_fp16; allow_fp32_to_fp16, "
                          "must_keep_origin_dtype, allow_mix_precision, ...) or a --precision_mode_v2 name "
                          "(fp16, origin, mixed_float16, ...); each mode converts its own OM; several, comma-"
                          "separated, run like several batch sizes (a summary row each)")
    run.add_argument("--sim-rate", type=float, metavar="CROPS_PER_S",
                     help="speed of each --backend sim device, in network inputs per second (default 1000)")
    run.add_argument("--sim-gil", choices=("hold", "release"),
                     help="whether each --backend sim call keeps Python's GIL, as aclruntime does on an NPU "
                          "(hold, the default), or releases it, as ONNX Runtime and torch do")
    run.add_argument("--shard-size", type=int, help="boxes per shard (rounded up to whole batches)")
    run.add_argument("--threads", type=int, help="backend threads per worker (default: its share of cores)")
    run.add_argument("--host-processes", type=int,
                     help="processes per worker that read, crop, build inputs, merge and decode, beside the one "
                          "that holds the device (default: sized to the host)")
    add_queue_args(run)
    run.add_argument("--address", help="join a Ray cluster: auto or HOST:PORT")
    run.add_argument("--ship-images", choices=("auto", "always", "never"),
                     help="send the images' bytes in the shards of workers whose node cannot see --dataroot "
                          "(auto, the default), to every worker (always), or stop with one line (never)")
    add_evaluation_args(p.add_argument_group("evaluation"))
    add_output_args(p.add_argument_group("output"))
    return p


def add_evaluation_args(ev: argparse._ArgumentGroup) -> None:
    """How the run's keypoints are scored and checked."""
    ev.add_argument("--check-backend", choices=["torch", "onnxruntime", "openvino"],
                    help="also run the first --check-boxes boxes through this backend on the CPU (torch: the "
                         "checkpoint itself) and write OUT/parity.json, box by box, with a verdict")
    ev.add_argument("--check-boxes", type=int, metavar="N", help="boxes of the parity check (default 64)")
    ev.add_argument("--evaluator", choices=["auto", "faster-coco-eval", "pycocotools"],
                    help="COCOeval implementation (default auto: faster-coco-eval where installed)")


def add_queue_args(run: argparse._ArgumentGroup) -> None:
    """When the shard queue gives up on a device or copies a late shard (cluster.queue)."""
    run.add_argument("--device-timeout", type=float, metavar="S",
                     help="a worker holding shards that returns nothing for S seconds is declared lost "
                          "(default: 10x the median shard time, at least 300; 0: never)")
    run.add_argument("--straggler-factor", type=float, metavar="K",
                     help="when the queue is empty, a shard in flight for K median shard times also runs on an "
                          "idle worker; the first result wins (default 3; 0: never)")
    run.add_argument("--straggler-floor", type=float, metavar="S",
                     help="... and for at least S seconds (default 10)")


def add_output_args(out: argparse._ArgumentGroup) -> None:
    """Where a run writes and what it writes besides its results."""
    out.add_argument("--out", help="output directory (default: out)")
    out.add_argument("--resume", action="store_true", default=None, help="continue an interrupted run in OUT")
    out.add_argument("--overwrite", action="store_true", default=None, help="replace the results in OUT")
    out.add_argument("--dump-heatmaps", action="store_true", default=None,
                     help="workers also write the merged heatmaps to OUT/heatmaps")
    out.add_argument("--no-report", dest="report", action="store_false", default=None,
                     help="write no OUT/report.html nor analysis.json (timeline.json is kept: milliseconds)")
    out.add_argument("--quiet", action="store_true", default=None)


def main_run(argv: list[str]) -> int:
    from runner.driver import run

    args = vars(run_parser().parse_args(argv))
    config_file = args.pop("config")
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

    p = argparse.ArgumentParser(prog="python -m runner doctor",
                                description="What a run needs on this host, each ok or missing with the fix.")
    p.add_argument("--bundle", metavar="FILE.tar.gz",
                   help="also write what a first Atlas host sends back (docs/ascend.md#send-back): this table, "
                        "npu-smi info and -m, versions, the ais_bench observations, the last run's run.json and "
                        "ATC logs; no environment, no Ray token")
    p.add_argument("--out", default="out", help="the run (or sweep) folder whose last run.json goes in (default out)")
    p.add_argument("--models-dir", help="where that run's OM and ATC logs are (default: its run.json says)")
    args = p.parse_args(argv)
    table = format_doctor(doctor())
    print(table)
    if args.bundle:
        from runner.bundle import write_bundle

        names = write_bundle(args.bundle, args.out, args.models_dir, table + "\n")
        print(f"\nwrote {args.bundle}: {', '.join(names)}")
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


def main_show(argv: list[str]) -> int:
    from pathlib import Path

    from runner.report_files import SHOW_IMAGES, show

    p = argparse.ArgumentParser(prog="python -m runner show",
                                description="PNGs of a saved run's images with its predicted skeletons drawn "
                                            f"(and the GT's, paler): the named images, or the {SHOW_IMAGES} worst.")
    p.add_argument("out", metavar="OUT", help="a run's output directory (a sweep's OUT/bs{N})")
    p.add_argument("--images", nargs="+", type=int, metavar="ID", help="COCO image ids (default: the worst)")
    p.add_argument("--out", dest="dest", metavar="DIR", help="where the PNGs go (default: OUT/show)")
    args = p.parse_args(argv)
    for path in show(Path(args.out), args.images, Path(args.dest) if args.dest else None):
        print(path)
    return 0


def main_detect(argv: list[str]) -> int:
    from runner.detect import main_detect as detect

    return detect(argv)


COMMANDS = {"doctor": main_doctor, "report": main_report, "detect": main_detect, "bench": main_bench,
            "show": main_show}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = COMMANDS.get(argv[0]) if argv else None
    try:
        return command(argv[1:]) if command else main_run(argv)
    except Interrupted as e:  # Ctrl-C: the journal is kept, --resume continues
        print(f"error: {e}", file=sys.stderr)
        return 130
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

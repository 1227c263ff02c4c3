"""``lensrun`` command line: a thin layer over ``lensrun.api`` (one option = one keyword)."""

from __future__ import annotations

import argparse
import sys
import warnings

from lensrun.acceleration import PRECISION_ALIASES, PRECISIONS
from lensrun.errors import LensrunError
from lensrun.memory import PLACEMENTS
from lensrun.prompting import DEFAULT_TEMPLATE_DATE
from lensrun.request import ASPECT_RATIOS, BASE_RESOLUTIONS, DEFAULT_MODEL, DTYPES, NOISE_SOURCES, TINY_MODEL, VARIANTS

TINY_NOTICE = (
    "note: --model tiny-random is a tiny model with random weights built in-process; its images are noise. "
    "It exists to check that lensrun is installed and working."
)


def _generation_options(p: argparse.ArgumentParser) -> None:
    """Options shared by `generate` and `gallery` (for a gallery they are defaults under the file's own)."""
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"folder or Hub repo id, or '{TINY_MODEL}'")
    p.add_argument("--variant", choices=list(VARIANTS), default=None, help="default: inferred from --model")
    p.add_argument("--base-resolution", type=int, default=None, help=f"one of {list(BASE_RESOLUTIONS)}")
    p.add_argument("--aspect-ratio", default=None, help=f"one of {', '.join(ASPECT_RATIOS)}")
    p.add_argument("--height", type=int, default=None, help="pixels, multiple of 16 (with --width)")
    p.add_argument("--width", type=int, default=None, help="pixels, multiple of 16 (with --height)")
    p.add_argument("--steps", type=int, default=None, help="default: the variant's preset")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale; default: the variant's preset")
    p.add_argument("--seed", type=int, default=None, help="-1 or absent: random (the drawn seed is recorded)")
    p.add_argument("--n", type=int, default=1, help="images per prompt")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bfloat16 on CUDA, else float32")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if present)")
    p.add_argument("--noise", choices=list(NOISE_SOURCES), default="cpu", help="where the seed's noise is drawn")
    p.add_argument("--template-date", default=DEFAULT_TEMPLATE_DATE, help="date written into the chat template")
    p.add_argument("--vram", default=None, help="GPU memory budget, e.g. 24GB (default: what is free now)")
    p.add_argument("--placement", choices=list(PLACEMENTS), default=None, help="override the planner's placement")
    precisions = [*PRECISIONS, *PRECISION_ALIASES]
    p.add_argument("--quantize", choices=precisions, default=None, help="override the DiT precision")
    p.add_argument("--offload", action="store_true", help="same as --placement offload")
    p.add_argument("--quant_transformer", choices=precisions, default=None, help="same as --quantize")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on for CUDA")
    p.add_argument("--cache", type=float, default=None, help="step-cache threshold (opt-in, e.g. 0.05; not Turbo)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lensrun", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate images from prompts")
    gen.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    gen.add_argument("--out", default="outputs", help="output folder")
    _generation_options(gen)

    gal = sub.add_parser("gallery", help="render a prompt file (TOML, JSON or text) to a resumable captioned gallery")
    gal.add_argument("file", help="TOML/JSON ([defaults] + [[image]] entries) or text (one prompt per line)")
    gal.add_argument("--out", required=True, help="gallery folder (images, manifest.jsonl, index.html)")
    _generation_options(gal)

    rep = sub.add_parser("replay", help="regenerate an image from its PNG, or from a gallery's manifest.jsonl row")
    rep.add_argument("image", help="a lensrun PNG or a gallery's manifest.jsonl")
    rep.add_argument("--entry", default=None, help="with a manifest: the entry (name or file) to replay")
    rep.add_argument("--out", default=None, help="output folder (default: replay/ beside the image)")
    rep.add_argument("--model", default=None, help="where the weights are now, if moved")
    rep.add_argument("--device", default=None)

    srv = sub.add_parser("serve", help="serve the model: OpenAI-compatible Images API, job queue, web page")
    srv.add_argument("--model", default=DEFAULT_MODEL)
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=7860)
    srv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/")
    srv.add_argument("--max-queue", type=int, default=16, help="jobs waiting at most; more get 429")
    srv.add_argument("--device", default=None)
    srv.add_argument("--dtype", choices=list(DTYPES), default=None)
    srv.add_argument("--vram", default=None, help="GPU memory budget for the planner")
    srv.add_argument("--files", default=None, help="folder for generated images (default: a temp folder)")
    srv.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on for CUDA")

    plan = sub.add_parser("plan", help="show every memory plan for a budget and size, and the one chosen")
    plan.add_argument("--vram", required=True, help="GPU memory budget, e.g. 24GB")
    plan.add_argument("--base-resolution", type=int, default=None)
    plan.add_argument("--aspect-ratio", default=None)
    plan.add_argument("--height", type=int, default=None)
    plan.add_argument("--width", type=int, default=None)
    plan.add_argument("--steps", type=int, default=None)
    plan.add_argument("--cfg", type=float, default=None)
    plan.add_argument("--variant", choices=list(VARIANTS), default="lens")
    plan.add_argument("--placement", choices=list(PLACEMENTS), default=None)
    plan.add_argument("--quantize", choices=[*PRECISIONS, *PRECISION_ALIASES], default=None)
    plan.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                      help="plan for a compiled run, as generate does on a GPU (CUDA graph pools)")  # fmt: skip
    return parser


def _print_result(path) -> None:
    from lensrun.metadata import read_report

    report = read_report(path)
    seconds = " ".join(f"{k}={v:.2f}s" for k, v in report.get("seconds", {}).items())
    peak = f" peak={report['peak_allocated_gib']:.2f}GiB (reserved {report['peak_reserved_gib']:.2f})" if "peak_allocated_gib" in report else ""
    print(f"{path}  plan={report.get('plan')}{peak} {seconds}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from lensrun import api

    try:
        if args.command == "generate":
            if args.model == TINY_MODEL:
                print(TINY_NOTICE, file=sys.stderr)
            kwargs = vars(args)
            del kwargs["command"]
            prompts = kwargs.pop("prompt")
            notify = lambda msg: print(f"lensrun: {msg}", file=sys.stderr)
            with warnings.catch_warnings():
                warnings.simplefilter("always", UserWarning)
                paths = api.generate(
                    prompts if len(prompts) > 1 else prompts[0], show_progress=True, notify=notify, **kwargs
                )
        elif args.command == "serve":
            from lensrun.server import serve

            serve(**{k: v for k, v in vars(args).items() if k != "command"})
            return 0
        elif args.command == "replay":
            paths = [
                api.replay(args.image, out=args.out, model=args.model, device=args.device, entry=args.entry, show_progress=True)
            ]
        elif args.command == "gallery":
            kwargs = {k: v for k, v in vars(args).items() if k != "command"}
            if kwargs["model"] == TINY_MODEL:
                print(TINY_NOTICE, file=sys.stderr)
            summary = api.gallery(kwargs.pop("file"), show_progress=True, **kwargs)
            print(f"done {summary['done']}, skipped {summary['skipped']}, failed {summary['failed']} — {summary['index']}")
            return 1 if summary["failed"] else 0
        else:
            print(api.plan_report(**{k: v for k, v in vars(args).items() if k != "command"}))
            return 0
    except LensrunError as err:
        print(f"lensrun: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        sys.stderr.close()
        return 0
    for path in paths:
        _print_result(path)
    return 0

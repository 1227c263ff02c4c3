"""``lensrun`` command line: parses and calls ``lensrun.api``. Every option flag is derived from the option
definitions in ``lensrun.request`` (one option = one flag = one API keyword)."""

from __future__ import annotations

import argparse
import sys
import warnings

from lensrun.errors import LensrunError
from lensrun.request import TINY_MODEL, EngineOptions, GenerationRequest, OptionSpec, option_specs

TINY_NOTICE = (
    "note: --model tiny-random is a tiny model with random weights built in-process; its images are noise. "
    "It exists to check that lensrun is installed and working."
)


def _add(p: argparse.ArgumentParser, spec: OptionSpec, **overrides) -> None:
    """One option as a flag; an absent flag leaves the option at its definition's default. Allowed values are
    listed in the help and checked by the request's own validation (its message names the option)."""
    choices = f" (one of: {', '.join(map(str, spec.choices))})" if spec.choices else ""
    kw: dict = {"default": argparse.SUPPRESS, "help": spec.help + choices, "dest": spec.name}
    if spec.type is bool:
        kw["action"] = "store_true" if spec.default is False else argparse.BooleanOptionalAction
    else:
        kw["type"] = spec.type
        if spec.repeated:
            kw["action"] = "append"
    kw.update(overrides)
    p.add_argument(spec.flag, **kw)


def _options(p: argparse.ArgumentParser, cls: type, only: tuple[str, ...] | None = None, skip: tuple[str, ...] = ()) -> None:
    for spec in option_specs(cls):
        if spec.name not in skip and (only is None or spec.name in only):
            _add(p, spec)


def _parser() -> argparse.ArgumentParser:
    from lensrun import __version__

    parser = argparse.ArgumentParser(prog="lensrun", description=__doc__)
    parser.add_argument("--version", action="version", version=f"lensrun {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    prompt = next(s for s in option_specs(GenerationRequest) if s.name == "prompt")

    gen = sub.add_parser("generate", help="generate images from prompts")
    _add(gen, prompt, required=True, default=None)
    gen.add_argument("--out", default="outputs", help="output folder")
    _options(gen, GenerationRequest, skip=("prompt",))
    _options(gen, EngineOptions)

    gal = sub.add_parser("gallery", help="render a prompt file (TOML, JSON or text) to a resumable captioned gallery")
    gal.add_argument("file", help="TOML/JSON ([defaults] + [[image]] entries) or text (one prompt per line)")
    gal.add_argument("--out", required=True, help="gallery folder (images, manifest.jsonl, index.html)")
    gal.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                     help="spread the images over every GPU of a Ray cluster (no ADDRESS: a local Ray instance)")
    gal.add_argument("--workers", type=int, default=None, help="with --ray: engines to start (default: one per GPU)")
    _options(gal, GenerationRequest, skip=("prompt",))
    _options(gal, EngineOptions)

    rep = sub.add_parser("replay", help="regenerate an image from its PNG, or from a gallery's manifest.jsonl row")
    rep.add_argument("image", help="a lensrun PNG or a gallery's manifest.jsonl")
    rep.add_argument("--entry", default=None, help="with a manifest: the entry (name or file) to replay")
    rep.add_argument("--out", default=None, help="output folder (default: replay/ beside the image)")
    rep.add_argument("--model", default=None, help="where the weights are now, if moved")
    rep.add_argument("--device", default=None)
    rep.add_argument("--check", action="store_true", help="compare the new image with the source and say how they differ")

    srv = sub.add_parser("serve", help="serve the model: OpenAI-compatible Images API, job queue, web page")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=7860)
    srv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/")
    srv.add_argument("--max-queue", type=int, default=16, help="jobs waiting at most; more get 429")
    srv.add_argument("--files", default=None, help="folder for generated images (default: a temp folder)")
    srv.add_argument("--replicas", type=int, default=1, help="engines, one per GPU (cuda:0…), serving one queue")
    srv.add_argument("--warmup", action="store_true",
                     help="compile before listening (otherwise requests run eagerly while it compiles on a side thread)")
    _options(srv, EngineOptions)

    conv = sub.add_parser("convert", help="a diffusers-layout Lens folder as ComfyUI's single files, or back")
    conv.add_argument("model", help="diffusers folder or Hub repo id (→ ComfyUI files), or a ComfyUI models folder (→ diffusers)")
    conv.add_argument("--out", required=True, help="the folder to write")
    conv.add_argument("--dit-format", choices=("bf16", "mxfp8"), default="bf16", help="the DiT file's format")
    conv.add_argument("--device", default="cpu", help="where to re-quantize (cuda is much faster at full size)")

    plan = sub.add_parser("plan", help="show every memory plan for a budget and size, and the one chosen")
    plan.add_argument("--vram", required=True, help="GPU memory budget, e.g. 24GB")
    _options(plan, GenerationRequest, only=("variant", "base_resolution", "aspect_ratio", "height", "width", "steps", "cfg"))
    _options(plan, EngineOptions, only=("model", "transformer", "text_encoder", "vae", "placement", "quantize"))
    plan.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                      help="plan for a compiled run (CUDA graph pools kept after their phase)")  # fmt: skip
    return parser


def _print_result(path) -> None:
    from lensrun.metadata import read_report

    report = read_report(path)
    seconds = " ".join(f"{k}={v:.2f}s" for k, v in report.get("seconds", {}).items())
    peak = f" peak={report['peak_allocated_gib']:.2f}GiB (reserved {report['peak_reserved_gib']:.2f})" if "peak_allocated_gib" in report else ""
    print(f"{path}  plan={report.get('plan')}{peak} {seconds}")


def _notify(message: str) -> None:
    print(f"lensrun: {message}", file=sys.stderr)


def _warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Python warnings as lensrun's own one-line messages (no source paths)."""
    print(f"lensrun: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    kwargs = {k: v for k, v in vars(args).items() if k != "command"}
    from lensrun import api

    warnings.showwarning = _warning
    try:
        if kwargs.get("model") == TINY_MODEL:
            print(TINY_NOTICE, file=sys.stderr)
        if args.command == "generate":
            prompts = kwargs.pop("prompt")
            paths = api.generate(prompts if len(prompts) > 1 else prompts[0], show_progress=True, notify=_notify, **kwargs)
        elif args.command == "serve":
            from lensrun.server import serve

            serve(**kwargs)
            return 0
        elif args.command == "convert":
            from lensrun.convert import convert

            for path in convert(kwargs["model"], kwargs["out"], kwargs["dit_format"], kwargs["device"], _notify):
                print(path)
            return 0
        elif args.command == "replay":
            paths = [api.replay(kwargs.pop("image"), show_progress=True, notify=_notify, **kwargs)]
        elif args.command == "gallery":
            summary = api.gallery(kwargs.pop("file"), show_progress=True, notify=_notify, **kwargs)
            print(f"done {summary['done']}, skipped {summary['skipped']}, failed {summary['failed']} — {summary['index']}")
            return 1 if summary["failed"] else 0
        else:
            print(api.plan_report(**kwargs))
            return 0
    except LensrunError as err:
        print(f"lensrun: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        where = kwargs.get("out")
        resume = " Run the same command again to resume: finished images are kept." if args.command == "gallery" else ""
        print(f"\nlensrun: interrupted; images finished so far are in {where}.{resume}", file=sys.stderr)
        return 130
    for path in paths:
        _print_result(path)
    return 0

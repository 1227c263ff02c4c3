"""``lensrun`` command line: a thin layer over ``lensrun.api`` (one option = one keyword)."""

from __future__ import annotations

import argparse
import sys
import warnings

from lensrun.errors import LensrunError
from lensrun.pipeline import DEFAULT_MODEL, TINY_MODEL
from lensrun.prompting import DEFAULT_TEMPLATE_DATE
from lensrun.request import ASPECT_RATIOS, BASE_RESOLUTIONS, DTYPES, NOISE_SOURCES, VARIANTS

TINY_NOTICE = (
    "note: --model tiny-random is a tiny model with random weights built in-process; its images are noise. "
    "It exists to check that lensrun is installed and working."
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lensrun", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate images from prompts")
    gen.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--model", default=DEFAULT_MODEL, help=f"folder or Hub repo id, or '{TINY_MODEL}'")
    gen.add_argument("--variant", choices=list(VARIANTS), default=None, help="default: inferred from --model")
    gen.add_argument("--base-resolution", type=int, default=None, help=f"one of {list(BASE_RESOLUTIONS)}")
    gen.add_argument("--aspect-ratio", default=None, help=f"one of {', '.join(ASPECT_RATIOS)}")
    gen.add_argument("--height", type=int, default=None, help="pixels, multiple of 16 (with --width)")
    gen.add_argument("--width", type=int, default=None, help="pixels, multiple of 16 (with --height)")
    gen.add_argument("--steps", type=int, default=None, help="default: the variant's preset")
    gen.add_argument("--cfg", type=float, default=None, help="guidance scale; default: the variant's preset")
    gen.add_argument("--seed", type=int, default=None, help="-1 or absent: random (the drawn seed is recorded)")
    gen.add_argument("--n", type=int, default=1, help="images per prompt")
    gen.add_argument("--out", default="outputs", help="output folder")
    gen.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bfloat16 on CUDA, else float32")
    gen.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if present)")
    gen.add_argument("--noise", choices=list(NOISE_SOURCES), default="cpu", help="where the seed's noise is drawn")
    gen.add_argument("--template-date", default=DEFAULT_TEMPLATE_DATE, help="date written into the chat template")

    rep = sub.add_parser("replay", help="regenerate an image from the config stored in its PNG")
    rep.add_argument("image")
    rep.add_argument("--out", default=None, help="output folder (default: replay/ beside the image)")
    rep.add_argument("--model", default=None, help="where the weights are now, if moved")
    rep.add_argument("--device", default=None)
    return parser


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
            with warnings.catch_warnings():
                warnings.simplefilter("always", UserWarning)
                paths = api.generate(prompts if len(prompts) > 1 else prompts[0], show_progress=True, **kwargs)
        else:
            paths = [api.replay(args.image, out=args.out, model=args.model, device=args.device, show_progress=True)]
    except LensrunError as err:
        print(f"lensrun: error: {err}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0

"""Write a weight-only int8 / int4 copy of a LLaVA checkpoint: any official layout in, layout A with the LLM's
linear layers quantized out (the format: weights/quantize.py, kernels/quant.py). Loading it needs no
re-quantization; --quantize int8 | int4 on generate.py, eval.py and serve.py quantizes while loading instead.

    python quantize.py llava-1.5-7b-hf llava-1.5-7b-int4 --bits 4 --group-size 64      # then --model llava-1.5-7b-int4
    python quantize.py llava-v1.5-7b OUT --bits 8 --vision clip-vit-large-patch14-336    # layouts B, C too
"""
import argparse
import sys
from pathlib import Path

from minillava.cli import DEFAULT_GROUP_SIZE
from minillava.kernels.quant import BITS, GROUP_SIZES
from minillava.weights.load import Progress, load_llava, read_json
from minillava.weights.quantize import QUANT_KEY, Quantization, check_targets, targets
from minillava.weights.save import llava_hf_state, write_checkpoint


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="checkpoint directory (layout A, B or C)")
    p.add_argument("out", help="directory to write (atomically: nothing is left half-written)")
    p.add_argument("--bits", type=int, choices=BITS, required=True)
    p.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE, choices=GROUP_SIZES,
                   help=f"int4: inputs per scale and offset (default: {DEFAULT_GROUP_SIZE})")
    p.add_argument("--vision", default=None, help="the CLIP directory (layouts B and C)")
    p.add_argument("--projector", default=None, help="the stage-1 projector file (layout C)")
    args = p.parse_args(argv)
    q = Quantization(args.bits, args.group_size if args.bits == 4 else None)
    src = Path(args.src)
    if Quantization.from_config(read_json(src / "config.json"), src / "config.json"):
        raise SystemExit(f"{src} is already quantized; quantize its dense source instead")
    model = load_llava(src, vision_path=args.vision, projector_path=args.projector, dtype=None)  # no copy
    check_targets(model, q, str(src))
    state, hf = llava_hf_state(model)
    names = targets(model)
    progress = Progress(len(names), "quantizing")
    for name in names:
        dense = state.pop(f"{name}.weight")
        state.update({f"{name}.{k}": v for k, v in q.tensors(dense).items()})
        progress.step()
    hf[QUANT_KEY] = q.to_json()
    tokenizer = src / "tokenizer.model"
    out = write_checkpoint(state, hf, args.out, tokenizer if tokenizer.is_file() else None)
    dense_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    q_bytes = sum(t.numel() * t.element_size() for t in state.values())
    print(f"{out}: {q}, {q_bytes / 1e9:.3f} GB of tensors (the source: {dense_bytes / 1e9:.3f} GB)")
    return out


def cli() -> int:
    """The command line (`python quantize.py`, `minillava-quantize`)."""
    main()
    return 0


if __name__ == "__main__":
    sys.exit(cli())

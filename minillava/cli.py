"""What the scripts (train.py, generate.py, demo.py, benchmarks/) share on the command line: flags built from a config
dataclass, each flag's help the comment written beside its field (one source for both), --device, and the CPU
thread count.

    @dataclass
    class GenerateConfig:
        temperature: float = 0.2  # 0 = greedy       ->  --temperature T   0 = greedy (default: 0.2)

Threads: PyTorch starts one thread per core it sees, but a container or a CPU quota may give the process fewer,
and on a shared machine idle-spinning OpenMP threads that outnumber the free cores make training and decoding
10-40x slower. `default_threads` counts the cores this process may really use (affinity and the cgroup quota);
OMP_NUM_THREADS, when set, wins; each script has --threads and prints the count it runs with.
"""
import argparse
import dataclasses
import inspect
import math
import os
import re

# --quantize and --group-size, as the scripts offer them before torch is imported (their --help answers at once);
# the formats are minillava.weights.quantize's and kernels/quant.py's, and tests/test_cli.py checks these agree.
QUANTIZE_CHOICES = ("none", "int8", "int4")
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 64


def field_help(cls) -> dict:
    """{field name: the `# comment` on its line in the class body}."""
    out = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.+)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def add_config_args(parser: argparse.ArgumentParser, cls, aliases=None, choices=None):
    """One flag per field of the dataclass `cls` (`--micro-batch` for micro_batch), its help the field's
    comment and its default. `aliases`: {field: ["--other-name", ...]} (the original LLaVA's flag names);
    `choices`: {field: allowed values}. Booleans get --flag / --no-flag; list fields take several values."""
    helps = field_help(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        names = ["--" + f.name.replace("_", "-"), *(aliases or {}).get(f.name, [])]
        text = helps.get(f.name, "")
        if f.type is bool or isinstance(default, bool):
            parser.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                help=text)
            continue
        kind = {"nargs": "+", "type": type(default[0])} if isinstance(default, (list, tuple)) else {"type": f.type}
        shown = "" if default in (None, "") else f" (default: {default})"
        parser.add_argument(*names, dest=f.name, default=default, help=text + shown, metavar=f.name.upper(),
                            choices=(choices or {}).get(f.name), **kind)


def optional_bool(text):
    """A flag's "true" / "false" -> True / False; not given ("" or None) -> None (the file's setting stands)."""
    return {"": None, None: None, "true": True, "false": False}[text]


def default_threads() -> int:
    """OMP_NUM_THREADS if set, else the cores this process may use: its CPU affinity, capped by a cgroup v2
    CPU quota (cpu.max "QUOTA PERIOD", as containers set it)."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"])
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def set_threads(n: int = 0) -> str:
    """Use n CPU threads (0: default_threads()) and return the line the scripts print about it."""
    import torch
    chosen = n or default_threads()
    torch.set_num_threads(chosen)
    why = "--threads" if n else ("OMP_NUM_THREADS" if "OMP_NUM_THREADS" in os.environ else "the cores this process "
                                 "may use")
    return f"threads: {chosen} ({why}; change with --threads N)"


def device_from_flag(name: str = "auto"):
    """--device -> a torch.device: "auto" (or empty) is cuda when there is one, else cpu. A device this machine
    does not have is a one-line error naming the flag, not torch's assertion from deep inside the first copy."""
    import torch
    if name in ("auto", "", None):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device (cpu, cuda, cuda:N, auto)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: this machine has no CUDA GPU that torch {torch.__version__} can use "
                             "(torch.cuda.is_available() is False); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif device.type != "cpu":
        raise ValueError(f"--device {name}: minillava runs on cpu or cuda")
    return device


def add_load_bits_flags(parser: argparse.ArgumentParser):
    """The original LLaVA's --load-8bit / --load-4bit, as --quantize int8 / int4 (the field `quantize`). Not its
    formats (bitsandbytes' LLM.int8 and NF4): minillava's weight-only int8 per channel and int4 in groups."""
    parser.add_argument("--load-8bit", dest="quantize", action="store_const", const="int8",
                        help="the original's flag: --quantize int8")
    parser.add_argument("--load-4bit", dest="quantize", action="store_const", const="int4",
                        help="the original's flag: --quantize int4")


def first_lines(lines: list[str], where: str, limit: int = 20) -> list[str]:
    """At most `limit` of the lines, and then how many more there are (all of them are in `where`): a data file
    with a systematic problem must not print one line per record."""
    more = len(lines) - limit
    return lines if more <= 1 else lines[:limit] + [f"... and {more} more (all in {where})"]


def wrong_image_folder(missing: int, with_image: int, folder: str, what: str):
    """Most of the items that name an image have no file: that is the folder, not the items. -> the error that says
    so (None otherwise), instead of one line per item."""
    if not missing or missing * 2 <= with_image:
        return None
    return ValueError(f"no image found for {missing} of {with_image} {what} with an image under --image-folder "
                      f"{os.path.abspath(folder or '.')}: check --image-folder (the \"image\" paths are relative "
                      "to it)")

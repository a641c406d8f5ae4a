"""SASS instruction counts of the CUDA scan kernels' main loops, without a GPU.

The scan kernels are bound by instruction issue (csrc/README.md: on an H200
the instructions per line explained the row scans' time), so the number of
machine instructions in a kernel's loop over tiles of lines is a figure a
kernel change can be judged by on a machine without a GPU: compile before and
after, compare. Prints, per kernel variant, its registers, its instructions
and those of its largest loop (one tile of lines), with the loop's mix.

Needs nvcc and cuobjdump. A toolkit without cuobjdump can take NVIDIA's wheel:
`pip download --no-deps nvidia-cuda-cuobjdump`, unzip it, and pass
`--cuobjdump <folder>/nvidia/cu13/bin/cuobjdump`.

  python scripts/sass_counts.py                          # float16, every scan kernel, sm_90
  python scripts/sass_counts.py --dtype float32 --match forward
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from check_cuda_compiles import ROOT, compile_one, nvcc_flags

INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+((?:@!?U?P\w+\s+)?[A-Z][A-Z0-9_.]*)([^;]*);")
# scan_forward_kernel<scalar_t, acc_t, RPT, NORM, V, GK, gate_t, SPLIT, CH>, scan_backward_kernel<..., RPT, NORM,
# ATOMIC, V, GK, gate_t, SPLIT, CH> (GK: lines per staged group, 0 for kernels that do not stage; gate_t float:
# decayed gates; SPLIT: lines split across a cluster; CH: channels per block, 2 for channel pairs)
VARIANT = re.compile(r"(scan_forward_kernel|scan_backward_kernel)I(.*)")


def describe(mangled: str) -> str:
    """A short name for one kernel variant from its mangled name."""
    match = VARIANT.search(mangled)
    if not match:
        return mangled
    name, rest = match.groups()
    ints = re.findall(r"Li(\d+)E", rest)  # RPT, positions per slot, lines per staged group, channels per block
    flags = [int(b) for b in re.findall(r"Lb([01])E", rest)]
    labels = ["norm"] if name == "scan_forward_kernel" else ["norm", "atomic"]
    pairs = f" V={ints[1]}" if len(ints) > 1 else ""
    staged = f" staged={ints[2]}" if len(ints) > 2 else ""
    gates = " gates=float" if re.search(r"Li\d+Ef(?:Lb[01]E)?(?:Li\d+E)?E", rest) else ""  # 16-bit inputs with float gates
    split = " split" if len(flags) > len(labels) and flags[-1] else ""  # lines split across a cluster
    channels = " channel-pairs" if len(ints) > 3 and ints[3] == "2" else ""
    return (f"{name} RPT={ints[0]}{pairs} " + " ".join(f"{label}={flag}" for label, flag in zip(labels, flags))
            + staged + gates + split + channels)


def largest_loop(instructions: list) -> list:
    """The instructions between the target and the source of the longest backward branch."""
    best = []
    for address, opcode, operands in instructions:
        target = re.search(r"0x([0-9a-f]+)", operands)
        if "BRA" in opcode and target and int(target.group(1), 16) < address:
            body = [i for i in instructions if int(target.group(1), 16) <= i[0] <= address]
            best = max(best, body, key=len)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32", "float64"])
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--match", default="", help="only kernels whose short name contains this")
    parser.add_argument("--cuobjdump", default=shutil.which("cuobjdump"))
    args = parser.parse_args()
    nvcc = shutil.which("nvcc")
    if nvcc is None or args.cuobjdump is None:
        print("sass_counts: needs nvcc and cuobjdump (see --help)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernels.cubin"
        proc = compile_one(nvcc, ROOT / "csrc" / f"gspn_scan_cuda_{args.dtype}.cu", nvcc_flags(), cubin,
                           targets=[f"-arch={args.arch}"], mode="-cubin")
        if proc.returncode != 0:
            print(proc.stdout + proc.stderr, file=sys.stderr)
            return 1
        sass = subprocess.run([args.cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([args.cuobjdump, "-res-usage", str(cubin)], capture_output=True, text=True,
                               check=True).stdout
    registers = dict(re.findall(r"Function (\S+):\s*\n?\s*REG:(\d+)", usage))
    rows = []
    for block in re.split(r"\n\s*Function : ", sass)[1:]:
        mangled = block.split("\n", 1)[0].strip()
        name = describe(mangled)
        if args.match not in name:
            continue
        instructions = [(int(a, 16), op, rest) for a, op, rest in INSTRUCTION.findall(block)]
        loop = largest_loop(instructions)
        mix = collections.Counter(op.split()[-1].split(".")[0] for _, op, _ in loop)
        top = ", ".join(f"{op} {n}" for op, n in mix.most_common(8))
        spills = sum(op.split()[-1].startswith(("LDL", "STL")) for _, op, _ in instructions)
        rows.append((name, registers.get(mangled, "?"), spills, len(instructions), len(loop), top))
    print(f"{args.dtype}, {args.arch}: registers, local-memory (spill) accesses, instructions, "
          "instructions in the largest loop (one tile of lines) and its mix")
    for name, regs, spills, total, loop, top in sorted(rows):
        print(f"{name:44s} reg {regs:>3s}  spill {spills:2d}  total {total:5d}  loop {loop:4d}  [{top}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())

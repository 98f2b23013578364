"""``minidalle env [--json]``: what the CPU capability probe found (minidalle.hardware)."""
from __future__ import annotations

import json


def add_parser(sub):
    p = sub.add_parser("env", help="show the CPU capability probe: ISA level, oneDNN ops, bf16 speed",
                       description="Print what minidalle.hardware found on this machine: the ISA "
                                   "level fast paths use (capped by MINIDALLE_CPU), whether each "
                                   "oneDNN op runs per dtype, the measured bf16/fp32 product "
                                   "speed, what precision \"auto\" picks and which decoding "
                                   "kernel is used.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args) -> int:
    from minidalle import hardware

    found = hardware.report()
    if "torch" in found:  # the decoding kernel (asked here: inference.gemv itself asks hardware)
        try:
            from minidalle.inference import gemv

            found["gemv_kernel"] = gemv.status()
        except Exception as e:  # the kernel module is optional
            found["gemv_kernel"] = f"unavailable: {e}"
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    for key, value in found.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k:<20} {v}")
        elif isinstance(value, list):
            print(f"{key:<22} {' '.join(value) or '-'}")
        else:
            print(f"{key:<22} {value}")
    return 0

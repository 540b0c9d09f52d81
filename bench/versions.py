"""Every version a run depends on, and where each package was imported from.

    python bench/versions.py [--json FILE]

Prints one line per item (Python, torch and its CUDA / cuDNN / NCCL, the GPU, and each pinned package of
requirements.txt with the file it was imported from), so a log shows which stack a check ran on: the
pinned one, or a machine's own image with carried wheels first on the path.
"""
from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys

# import name -> distribution name, for the packages requirements.txt pins (plus numpy and Pillow, which
# torchvision brings)
PACKAGES = {"torch": "torch", "torchvision": "torchvision", "timm": "timm", "einops": "einops",
            "safetensors": "safetensors", "yaml": "pyyaml", "tqdm": "tqdm", "matplotlib": "matplotlib",
            "tensorboard": "tensorboard", "hypothesis": "hypothesis", "pytest": "pytest", "numpy": "numpy",
            "PIL": "pillow", "filelock": "filelock", "wids": "wids", "braceexpand": "braceexpand"}


def collect() -> dict:
    report = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
              "packages": {}}
    for module_name, dist in PACKAGES.items():
        try:
            module = importlib.import_module(module_name)
        except Exception as e:  # noqa: BLE001 - a missing package is a finding, not a crash
            report["packages"][dist] = {"version": None, "error": f"{type(e).__name__}: {e}"}
            continue
        version = getattr(module, "__version__", None)
        if version is None:
            from importlib.metadata import PackageNotFoundError, version as dist_version
            try:
                version = dist_version(dist)
            except PackageNotFoundError:
                version = "unknown"
        report["packages"][dist] = {"version": str(version), "from": getattr(module, "__file__", None)}
    import torch
    report["torch_cuda"] = torch.version.cuda
    report["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        report["gpu"] = torch.cuda.get_device_name(0)
        report["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        report["cudnn"] = torch.backends.cudnn.version()
        try:
            report["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception as e:  # noqa: BLE001
            report["nccl"] = f"unavailable ({type(e).__name__})"
    return report


def main(argv: list | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=None, help="also write the report to this file")
    args = p.parse_args(argv)
    report = collect()
    for key, value in report.items():
        if key != "packages":
            print(f"{key:>16}: {value}")
    for dist, info in report["packages"].items():
        where = info.get("from") or info.get("error")
        print(f"{dist:>16}: {info['version']}  ({where})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
    return report


if __name__ == "__main__":
    main()

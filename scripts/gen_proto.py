"""Generate the Python stubs of proto/ into the thin client's package.

    python scripts/gen_proto.py          # regenerate client/curvscope/_proto
    python scripts/gen_proto.py --check  # fail if the committed stubs differ from a fresh run

The stubs live under ``curvscope._proto`` so that they never clash with another package's
``curvscope.v1``; protoc writes absolute imports, which are rewritten to that prefix.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc
import grpc_tools

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "proto"
TARGET = ROOT / "client" / "curvscope" / "_proto"
IMPORT_PREFIX = "curvscope._proto."


def generate(out_dir: Path) -> None:
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for path in out_dir.rglob("*.py*"):
        text = path.read_text()
        text = re.sub(r"^from curvscope\.", f"from {IMPORT_PREFIX}curvscope.", text, flags=re.M)
        path.write_text(text)
    for package_dir in [out_dir, *[p for p in out_dir.rglob("*") if p.is_dir()]]:
        (package_dir / "__init__.py").touch()


def differences(a: Path, b: Path) -> list[str]:
    files_a = {p.relative_to(a) for p in a.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    files_b = {p.relative_to(b) for p in b.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    changed = [str(p) for p in files_a & files_b if not filecmp.cmp(a / p, b / p, shallow=False)]
    return sorted(changed + [f"{p} (only in one)" for p in files_a ^ files_b])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed stubs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        if args.check:
            changed = differences(fresh, TARGET)
            if changed:
                print("generated stubs are out of date; run scripts/gen_proto.py:", *changed, sep="\n  ")
                return 1
            print("generated stubs are up to date")
            return 0
        shutil.rmtree(TARGET, ignore_errors=True)
        shutil.copytree(fresh, TARGET)
    return 0


if __name__ == "__main__":
    sys.exit(main())

